"""The offline demo and `gdrd-fast ablate` / `analyze` at --quick scale: every output is written, says what
data it measured, reports std over seeds, and a stopped grid resumes to the same numbers."""
import hashlib
import json

import pytest

from gdrd_fast import cli
from gdrd_fast.data import write_synthetic_dataset
from gdrd_fast.demo import load_demo_config, run_demo
from gdrd_fast.demo.ablate import PIXELS_ROW, RANDOM_ROW, TG_ROW, run_grid
from gdrd_fast.demo.interpret import interpret
from gdrd_fast.train.checks import file_sha256

QUICK_VARIANTS = ["ablation.variants=[baseline, gdrd]"]  # two students x two seeds keep the test short


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


@pytest.mark.diffusers
@pytest.mark.slow
def test_quick_demo_ablation_geometry_resume_and_analyze(tmp_path, capsys):
    config = load_demo_config(quick=True, overrides=QUICK_VARIANTS)
    (tmp_path / "demo.log").write_text("a line of an earlier run\n")
    result = run_demo(tmp_path, config, progress=False, jobs=1)
    for name in ("results.md", "results.json", "demo.log", "ablation.md"):
        assert "SYNTHETIC" in (tmp_path / name).read_text(), f"{name} does not say SYNTHETIC"
    for name in ("results.md", "results.json", "demo.log"):  # --quick's numbers are labelled as what they are
        assert "SMOKE RUN" in (tmp_path / name).read_text(), f"{name} does not say SMOKE RUN"
    log = (tmp_path / "demo.log").read_text()  # appended: the earlier run's lines come first
    assert log.startswith("a line of an earlier run\n") and "a new run in" in log
    for name in ("ablation.png", "training.png", "geometry/cosine.png", "geometry/embedding.png"):
        _png(tmp_path / name)
    payload = json.loads((tmp_path / "results.json").read_text())
    for entry in payload["teachers"].values():  # the teachers' files and hashes, in the log too
        assert entry["sha256"] == file_sha256(entry["weights"]) and entry["sha256"] in log
    assert set(payload["teachers"]) == {"hr", "denoiser"}
    students = payload["ablation"]["students"]
    assert set(students) == {"baseline@8", "gdrd@8"}
    # the teachers ran once, into the cache; the GDRD cells read it instead of running them at every step
    reads = {(c["variant"], c["seed"]): c["teacher_cache"]["read"] for c in payload["ablation"]["cells"]}
    assert reads[("gdrd", 0)] == reads[("gdrd", 1)] == {"stage1": ["tap"], "stage2": ["embedding"]}
    assert reads[("baseline", 0)] == {"single": []}
    for row in students.values():  # mean +- std over the two seeds
        assert row["seeds"] == [0, 1] and len(row["accuracy"]["values"]) == 2 and row["accuracy"]["std"] >= 0
        assert 0 <= row["probe"]["mean"] <= 1
    refs = payload["ablation"]["references"]
    assert "probe" in refs["generative teacher T_g (denoiser encoder, flattened)"]["8"]
    assert "probe" in refs["the LR face's own pixels (flattened)"]["8"]
    assert any(k.startswith("S_b after stage 1 vs T_g") for k in payload["geometry"]["cka"])
    text = (tmp_path / "results.md").read_text()
    assert "What the numbers show" in text and "does not show" in text and result["text"] in text
    assert "load average" in text

    # resume: a finished grid reruns nothing; a cell whose result is lost reruns from its checkpoints
    cell = tmp_path / "cells" / "gdrd-r8-s1"
    student_mtime = (cell / "student.pt").stat().st_mtime_ns
    again = run_grid(tmp_path, config, ["baseline", "gdrd"], [8], 2, progress=False, jobs=1)
    assert (cell / "student.pt").stat().st_mtime_ns == student_mtime
    assert again["students"] == students
    # the reference rows are read back, not computed again (same recipe, same teachers)
    assert again["references"] == result["summary"]["references"]
    assert "reference rows: read back" in (tmp_path / "ablate.log").read_text()
    (cell / "result.json").unlink()
    resumed = run_grid(tmp_path, config, ["baseline", "gdrd"], [8], 2, progress=False, jobs=1)
    assert resumed["students"]["gdrd@8"] == students["gdrd@8"]
    # ablation.build_spread says how the table is read: another value reruns nothing, and neither does a grid
    # stamped when the hash still covered it (its cells and reference rows are taken over)
    reread = load_demo_config(quick=True, overrides=QUICK_VARIANTS + ["ablation.build_spread=1.5"])
    student_mtime = (cell / "student.pt").stat().st_mtime_ns
    stamp = json.loads((tmp_path / "grid.json").read_text())
    legacy = hashlib.sha256(json.dumps([stamp["config"], stamp["train_root"], stamp["pairs"]], sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    for path in [tmp_path / "grid.json", *tmp_path.glob("cells/*/result.json")]:
        path.write_text(json.dumps(json.loads(path.read_text()) | {"spec_hash": legacy}))
    refs_file = tmp_path / "references.json"
    saved_refs = json.loads(refs_file.read_text())
    refs_file.write_text(json.dumps(saved_refs | {"key": saved_refs["key"] | {"spec_hash": legacy}}))
    for _ in range(2):
        again = run_grid(tmp_path, reread, ["baseline", "gdrd"], [8], 2, progress=False, jobs=1)
        assert (cell / "student.pt").stat().st_mtime_ns == student_mtime and again["students"] == students
        assert again["references"] == result["summary"]["references"]
    assert legacy != json.loads((tmp_path / "grid.json").read_text())["spec_hash"]
    other = load_demo_config(quick=True, overrides=QUICK_VARIANTS + ["stage1.steps=2"])
    with pytest.raises(ValueError, match="another recipe"):
        run_grid(tmp_path, other, ["gdrd"], [8], 1, progress=False, jobs=1)

    assert cli.main(["analyze", str(tmp_path), "--output", str(tmp_path / "analysis")]) == 0
    geometry = json.loads((tmp_path / "analysis" / "geometry.json").read_text())
    assert "S_b after stage 1" in geometry["features"] and "CKA" in capsys.readouterr().out


@pytest.mark.diffusers
@pytest.mark.slow
def test_ablate_cli_runs_a_grid_over_resolutions_in_parallel_processes(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["ablate", "--quick", "--variants", "stage1-probe", "kd", "--resolutions", "4", "8", "--seeds",
                     "2", "--jobs", "2", "--output", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary["students"]) == {"stage1-probe@4", "stage1-probe@8", "kd@4", "kd@8"}
    assert summary["jobs"] == 2 and all(len(r["seeds"]) == 2 for r in summary["students"].values())
    # the denoiser trained in a grid process while the other ran kd cells; stage1-probe waited for it
    assert (out / "teachers" / "denoiser.log").is_file()
    # and then cached both teachers' outputs, which the stage1-probe cells that waited for it read
    assert set(summary["teacher_timings_s"]) == {"HR teacher", "denoiser", "teacher cache r4", "teacher cache r8"}
    assert all(c["teacher_cache"]["read"] == {"stage1": ["tap"]} for c in summary["cells"]
               if c["variant"] == "stage1-probe")
    assert [(c["variant"], c["resolution"], c["seed"]) for c in summary["cells"]] == [
        (v, r, s) for r in (4, 8) for s in (0, 1) for v in ("stage1-probe", "kd")]  # grid order
    _png(out / "ablation.png")
    assert "stage1-probe" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # one line that names the valid variants
        cli.main(["ablate", "--quick", "--variants", "gdrd-fast", "--output", str(out)])
    assert exit_info.value.code == 2 and "gdrd-e2e" in capsys.readouterr().err


@pytest.mark.diffusers
def test_quick_demo_on_a_real_folder_and_bin(tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "data", num_train_identities=12, images_per_identity=6,
                                   num_test_identities=20, test_images_per_identity=3, pairs_per_fold=4,
                                   image_size=48)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out), "--train-root", str(data["train"]),
                     "--pairs", str(data["pairs"]), "--jobs", "1", "--set", "ablation.variants=[gdrd]",
                     "--set", "ablation.seeds=1"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["synthetic"] is False and str(data["pairs"]) in payload["dataset"]
    assert "real data" in (out / "results.md").read_text() and "real data" in capsys.readouterr().out
    assert "probe" not in payload["ablation"]["students"]["gdrd@8"]  # a pairs file has no identity labels


def test_demo_recipe_budget_and_ablation_are_checked():
    config = load_demo_config()
    assert config.student_budget.steps == config.stage1.steps + config.stage2.optim.steps
    assert config.ablation.variants == ["baseline", "crd", "crrcd", "gdrd", "gdrd-e2e"] and config.ablation.seeds == 2
    with pytest.raises(ValueError, match="unknown config key"):
        load_demo_config(overrides=["stage2.rcd.negatives=3"])
    with pytest.raises(ValueError, match="ablation.variants must be among"):
        load_demo_config(overrides=["ablation.variants=[gdrd, sota]"])
    with pytest.raises(ValueError, match="allow_random_teachers"):  # the recipe says its teachers are its own
        load_demo_config(overrides=["allow_random_teachers=false"])


@pytest.mark.parametrize("tg_probe, verdict", [(0.05, "no more identity than random ones"),
                                               (0.12, "no more than the pixels they are computed from"),
                                               (0.30, "more identity than random ones and than the pixels")])
def test_the_demo_text_judges_the_generative_teacher_against_random_features_and_pixels(tg_probe, verdict):
    refs = {TG_ROW: {16: {"probe": tg_probe}}, RANDOM_ROW: {16: {"probe": 0.10}}, PIXELS_ROW: {16: {"probe": 0.15}}}
    text = interpret({"students": {}, "references": refs}, None, load_demo_config())
    assert verdict in text and f"{100 * tg_probe:.2f}%" in text and "15.00% for the LR face's own pixels" in text


def test_the_demo_modules_import_each_other_one_way():
    """Every import between the demo's modules, function-level ones included, follows one order: no circle."""
    import ast
    from pathlib import Path

    import gdrd_fast.demo
    folder = Path(gdrd_fast.demo.__file__).parent
    edges = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names |= {node.module} if node.module else {a.name for a in node.names}
        edges[path.stem] = names & {p.stem for p in folder.glob("*.py")} - {"__init__"}
    assert edges["ablate"] and edges["run"]  # the scan sees the imports it must order

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in edges.get(start, ()))
    circles = sorted(m for m in edges if m != "__init__" and reaches(m, m))
    assert not circles, f"demo modules in an import circle: {circles}"



@pytest.mark.parametrize("spread, verdict", [(0.0, "is above"), (1.0, "is above"),
                                             (2.0, "is within the build-to-build noise of")])
def test_a_difference_smaller_than_the_build_spread_is_read_as_noise(spread, verdict):
    """93.75 +- 0.35 against 92.33 +- 1.15: 1.42 points, above both seed std's; a build spread of 2 points
    (README "The demo") makes it noise, one of 1 point does not."""
    students = {"gdrd@16": {"variant": "gdrd", "seeds": [0, 1], "accuracy": {"mean": 0.9375, "std": 0.0035}},
                "crrcd@16": {"variant": "crrcd", "seeds": [0, 1], "accuracy": {"mean": 0.9233, "std": 0.0115}}}
    config = load_demo_config(overrides=[f"ablation.build_spread={spread}"])
    text = interpret({"students": students, "references": {}}, None, config)
    line = next(line for line in text.splitlines() if "CRRCD" in line)
    assert f"GDRD (module-wise) {verdict} CRRCD" in line and "+1.42 points" in line
    assert ("build spread" in line) == bool(spread)
    with pytest.raises(ValueError, match="build_spread >= 0"):
        load_demo_config(overrides=["ablation.build_spread=-1"])


def test_the_grid_starts_the_costliest_cells_first_and_the_denoiser_before_them():
    from gdrd_fast.demo.ablate import by_cost

    def cell(variant, seed):
        return (f"{variant}-s{seed}", "run_cell", {"variant": variant, "config": {
            "stage1": {"steps": 200}, "stage2": {"optim": {"steps": 400}}}})
    queue = [cell(v, s) for s in (0, 1) for v in ("baseline", "crd", "crrcd", "gdrd", "gdrd-e2e")]
    queue.insert(3, (None, "train_denoiser_job", {"grid_dir": "x"}))
    keys = [t[0] for t in by_cost(queue)]
    assert keys[0] is None  # the denoiser gates the generative cells: it starts at once
    # longest first; equal costs keep the grid's order (seed 0 before seed 1)
    assert keys[1:] == ["crrcd-s0", "gdrd-e2e-s0", "crrcd-s1", "gdrd-e2e-s1", "crd-s0", "crd-s1", "baseline-s0",
                        "baseline-s1", "gdrd-s0", "gdrd-s1"]


def test_the_synthetic_sets_are_rendered_once_per_grid_and_read_back_identical(tmp_path, monkeypatch):
    from gdrd_fast.data import SyntheticFaces
    from gdrd_fast.demo import data as demo_data

    first = demo_data.synthetic_faces(3, 2, 0, 16, 5, tmp_path)
    (saved,) = tmp_path.glob("synthetic-*.pt")
    fresh = SyntheticFaces(3, 2, 0, 16, first_identity=5)
    assert first.pixels.equal(fresh.pixels) and first.targets.equal(fresh.targets)
    assert first.samples == fresh.samples and first.name == fresh.name
    monkeypatch.setattr(demo_data, "_RENDERED", {})  # another process of the grid: read from disk, not drawn
    init = SyntheticFaces.__init__

    def no_drawing(self, *args, pixels=None, **kwargs):
        if pixels is None:
            pytest.fail("the set was drawn again")
        init(self, *args, pixels=pixels, **kwargs)
    monkeypatch.setattr(SyntheticFaces, "__init__", no_drawing)
    again = demo_data.synthetic_faces(3, 2, 0, 16, 5, tmp_path)
    assert again.pixels.equal(fresh.pixels) and again[1][1] == fresh[1][1]
    assert demo_data.synthetic_faces(3, 2, 0, 16, 5).pixels is again.pixels  # then from memory, without a folder
