"""The demo's short text: what its measured numbers show and what they do not, generated from them.

A difference between two students counts as shown only when it exceeds both their seed std's (a crude
rule for 2..5 seeds, said as such) and the recipe's build spread: how far a difference between two rows
moved between torch builds and thread counts on the same seeds (ablation.build_spread, measured; README "The demo"). Everything
else is reported as within the noise.
"""
from __future__ import annotations

from .ablate import PIXELS_ROW, RANDOM_ROW, TG_ROW

NAMES = {"baseline": "the baseline (no distillation)", "crd": "CRD", "crrcd": "CRRCD (ArcFace + KD + RCD)",
         "kd": "KD", "gdrd": "GDRD (module-wise)", "gdrd-e2e": "GDRD end to end", "gdrd-unfrozen":
         "GDRD with stage 2 fine-tuning the backbone", "stage1-probe": "the stage-1 backbone alone"}


def _entry(summary: dict, variant: str, r: int, metric: str = "accuracy"):
    return summary["students"].get(f"{variant}@{r}", {}).get(metric)


def compare(summary: dict, a: str, b: str, r: int, metric: str = "accuracy", build_spread: float = 0.0) -> str | None:
    """'A is above/below/within the noise of B (x.xx vs y.yy, ...)' or None when either is missing;
    build_spread: points a difference between two rows moves across torch builds and thread counts."""
    ea, eb = _entry(summary, a, r, metric), _entry(summary, b, r, metric)
    if ea is None or eb is None:
        return None
    diff = 100 * (ea["mean"] - eb["mean"])
    seed_noise = 100 * max((e["std"] for e in (ea, eb) if e["std"] == e["std"]), default=0.0)
    numbers = f"{100 * ea['mean']:.2f} vs {100 * eb['mean']:.2f}, seed std up to {seed_noise:.2f}"
    if build_spread:
        numbers += f", build spread {build_spread:.2f}"
    noise = max(seed_noise, build_spread)
    if noise and abs(diff) <= noise:
        verdict = "is within the seed noise of" if abs(diff) <= seed_noise else "is within the build-to-build noise of"
    elif seed_noise == 0.0:
        verdict = "differs (one seed: no noise estimate) from"
    else:
        verdict = "is above" if diff > 0 else "is below"
    return f"{NAMES.get(a, a)} {verdict} {NAMES.get(b, b)} by {diff:+.2f} points ({numbers})"


def _teacher_verdict(tg: float, random: float, pixels: float | None) -> str:
    if tg <= random:
        return "Its features carry no more identity than random ones, so stage 1 distils little identity."
    if pixels is not None and tg <= pixels:
        return ("Its features carry more identity than random ones but no more than the pixels they are computed "
                "from: stage 1 teaches the backbone a representation, not identity the input lacks.")
    return "Its features carry more identity than random ones and than the pixels they are computed from."


def interpret(summary: dict, geometry: dict | None, config) -> str:
    r = config.resolution
    variants = list(dict.fromkeys(row["variant"] for row in summary["students"].values()))
    seeds = max((len(row["seeds"]) for row in summary["students"].values()), default=0)
    lines = [f"Verification accuracy at {r}x{r}, mean over {seeds} seed(s):"]
    for a, b in [(v, "baseline") for v in variants if v != "baseline"] + [("gdrd", "gdrd-e2e"), ("gdrd", "crrcd"),
                                                                          ("gdrd", "crd")]:
        if a in variants and b in variants:
            sentence = compare(summary, a, b, r, build_spread=config.ablation.build_spread)
            if sentence:
                lines.append(f"- {sentence}.")
    refs = summary["references"]
    tg, rnd, pixels = (refs.get(row, {}).get(r, {}) for row in (TG_ROW, RANDOM_ROW, PIXELS_ROW))
    if "probe" in tg and "probe" in rnd:
        lines += ["", f"Does the generative teacher deserve the name? A linear probe on its encoder features of "
                      f"{r}x{r} faces reaches {100 * tg['probe']:.2f}% on unseen identities, against "
                      f"{100 * rnd['probe']:.2f}% for an untrained student's random features"
                      + (f" and {100 * pixels['probe']:.2f}% for the LR face's own pixels" if "probe" in pixels else "")
                      + ". " + _teacher_verdict(tg["probe"], rnd["probe"], pixels.get("probe"))]
        probes = {v: _entry(summary, v, r, "probe") for v in variants}
        best = max((v for v in probes if probes[v]), key=lambda v: probes[v]["mean"], default=None)
        if best is not None:
            lines.append(f"The best student probe is {NAMES.get(best, best)} at {100 * probes[best]['mean']:.2f}%.")
    if geometry is not None and geometry.get("cka"):
        cka = ", ".join(f"{pair}: {value:.2f}" for pair, value in geometry["cka"].items())
        lines += ["", f"Feature geometry of the GDRD student (seed 0): linear CKA {cka}. CKA measures how alike two "
                      "representations are, not how good either is."]
    lines += ["", "What this does not show: anything about real faces (the data is synthetic), about the paper's "
                  "networks (these are ~1/100 of IResNet-18 with a tiny denoiser as T_g), or about long training "
                  f"(every student gets {config.student_budget.steps} steps). With {seeds} seed(s) only large "
                  "differences are distinguishable from noise, and the teachers are trained once, so their own "
                  "variance is not in the std. Nothing was tuned to favour any variant."]
    return "\n".join(lines)
