"""The paper's evaluations, one call each over the layouts the data sets are released in.

* Verification over several insightface pairs .bin (lfw, cfp_fp, agedb_30, ...) and several input
  resolutions: one table (Markdown + JSON) and one figure, accuracy against resolution, a line per set.
* TinyFace: Testing_Set/{Probe, Gallery_Match, Gallery_Distractor}. Probe and Gallery_Match images and
  their identities come from the released lists (probe_img_ID_pairs.mat, gallery_match_img_ID_pairs.mat)
  where present; otherwise every image of the folder, its identity the integer before the first '_' of
  its file name (e.g. 1234_2.jpg). Distractors have none. CMC rank-1/5/10/20 of every probe over the
  full gallery (match + distractors).
* UCCS-style: an identity-folder root and a split file (gdrd_fast.data.splits: 'train' / 'test'
  lines); a linear classifier on the frozen train features, top-1 on test (and the CMC of the test
  images against the train images as gallery).
* AR-style: ROOT/gallery/<identity>/* and ROOT/<subset>/<identity>/* for every other folder (e.g.
  sunglasses, scarf, illumination); one CMC per subset against the gallery, and one over all probes.

Every image is resized to the network's 112x112 input; at a resolution r it is then degraded to r x r
and back (gdrd_fast.data.degrade); 'hr' (None) keeps it as it is (TinyFace's faces are natively tiny).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from ..data import IdentityFolderDataset, degrade, load_pairs_bin, read_split_file
from ..data.folder import ImageListDataset, image_files
from ..data.images import atomic_write_bytes
from .embeddings import embed_dataset, extract_embeddings
from .identification import RANKS, cmc, linear_probe, subset_report
from .report import markdown_table, save_png, write_identification_report, write_json
from .verification import VerificationResult, verify

INPUT_SIZE = 112


def resolution_label(resolution: int | None) -> str:
    side = INPUT_SIZE if resolution is None else resolution
    return f"{side}x{side}"


def _transform(resolution: int | None) -> Callable[[Tensor], Tensor] | None:
    return None if resolution is None else (lambda x: degrade(x, resolution))


# ---- verification over several sets ------------------------------------------------------------------

def verify_sets(net: nn.Module, pairs: Sequence[str | os.PathLike], resolutions: Sequence[int | None],
                batch_size: int = 128, device: torch.device | str = "cpu",
                progress: bool = True) -> dict[str, dict[str, VerificationResult]]:
    """{set name (file stem): {'16x16': result, ...}} for every pairs .bin at every resolution."""
    if not pairs or not resolutions:
        raise ValueError("need at least one pairs .bin and one resolution")
    names = [Path(p).stem for p in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"two pairs files share a name: {names}")
    results: dict[str, dict[str, VerificationResult]] = {}
    for name, path in zip(names, pairs):
        images, issame = load_pairs_bin(path, progress=progress)
        if images.shape[-1] != INPUT_SIZE or images.shape[-2] != INPUT_SIZE:
            images = torch.nn.functional.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                                                     antialias=True, align_corners=False).clamp_(-1.0, 1.0)
        results[name] = {}
        for r in resolutions:
            emb = extract_embeddings(net, images, batch_size=batch_size, transform=_transform(r), device=device,
                                     progress=progress, desc=f"{name} {resolution_label(r)}")
            results[name][resolution_label(r)] = verify(emb[0::2], emb[1::2], issame)
    return results


def plot_accuracy_vs_resolution(path: str | os.PathLike, results: dict[str, dict[str, VerificationResult]],
                                title: str) -> Path:
    """Accuracy (%) against the input side (log2 axis), one line per set, into a PNG (matplotlib Agg)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2), dpi=120)
    ax = fig.add_subplot()
    sides = set()
    for name, per in results.items():
        points = sorted((int(label.split("x")[0]), r.accuracy) for label, r in per.items())
        sides.update(s for s, _ in points)
        ax.plot([s for s, _ in points], [100 * a for _, a in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sides), [f"{s}x{s}" for s in sorted(sides)])
    ax.set_xlabel("input resolution")
    ax.set_ylabel("verification accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    return save_png(fig, path)


def write_sets_report(out_dir: str | os.PathLike, results: dict[str, dict[str, VerificationResult]],
                      extra: dict | None = None) -> dict[str, Path]:
    """verification.json (every result), verification.md (one row per set and resolution) and
    accuracy_vs_resolution.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"set": name, "resolution": label, "accuracy %": r.accuracy, "std %": r.accuracy_std,
             "TAR %": r.tar, "at FAR": f"{r.far_level:.2g}", "AUC %": r.auc, "pairs": r.num_pairs}
            for name, per in results.items() for label, r in per.items()]
    payload = {"protocol": "LFW verification (insightface conventions) per set and resolution",
               "results": {name: {label: r.as_dict() for label, r in per.items()} for name, per in results.items()},
               **(extra or {})}
    md = out / "verification.md"
    atomic_write_bytes(md, ("# Verification by set and resolution\n\n" + markdown_table(rows)).encode())
    return {"json": write_json(out / "verification.json", payload), "markdown": md,
            "figure": plot_accuracy_vs_resolution(out / "accuracy_vs_resolution.png", results,
                                                  "accuracy vs input resolution")}


# ---- TinyFace ------------------------------------------------------------------------------------------

@dataclass
class TinyFaceLayout:
    probe: list[Path]
    probe_labels: Tensor
    gallery_match: list[Path]
    gallery_labels: Tensor
    distractors: list[Path]


# The released protocol lists: (file, cell array of file names, identities), in Testing_Set/ or in the
# evaluation kit's Face_Identification_Evaluation/ beside it.
TINYFACE_LISTS = {"Probe": ("probe_img_ID_pairs.mat", "probe_set", "probe_ids"),
                  "Gallery_Match": ("gallery_match_img_ID_pairs.mat", "gallery_set", "gallery_ids")}
MAX_LIST_BYTES = 64 << 20  # the released lists are a few hundred KB


def _label_from_name(path: Path) -> int:
    head = path.name.split("_", 1)[0]
    if not head.isdigit():
        raise ValueError(f"{path}: a TinyFace Probe / Gallery_Match file name starts with its identity and '_' "
                         "(e.g. 1234_2.jpg)")
    return int(head)


def _released_list(root: Path, part: str) -> tuple[list[Path], Tensor] | None:
    """The images of `part` and their identities from TinyFace's .mat list, or None where it is absent."""
    name, names_key, ids_key = TINYFACE_LISTS[part]
    found = [p for p in (root / name, root.parent / "Face_Identification_Evaluation" / name) if p.is_file()]
    if not found:
        return None
    path = found[0]
    if path.stat().st_size > MAX_LIST_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a TinyFace list can hold")
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError(f"reading {path} needs scipy: pip install scipy") from exc
    try:
        mat = loadmat(path)
        names = [str(np.asarray(cell).ravel()[0]) for cell in np.asarray(mat[names_key]).ravel()]
        ids = np.asarray(mat[ids_key]).ravel()
    except Exception as exc:  # a malformed list: name the file and what was expected
        raise ValueError(f"{path}: not a TinyFace list with '{names_key}' (file names) and '{ids_key}' "
                         f"(identities): {type(exc).__name__}: {exc}") from exc
    if not names or len(names) != len(ids):
        raise ValueError(f"{path}: {len(names)} file names and {len(ids)} identities (need the same, > 0)")
    if not np.issubdtype(ids.dtype, np.number) or not np.array_equal(ids, np.round(ids)):
        raise ValueError(f"{path}: '{ids_key}' must hold integer identities (MATLAB may store them as double)")
    files = [root / part / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{path} lists {len(missing)} images that are not in {root / part}, e.g. {missing[:3]}")
    return files, torch.from_numpy(ids.astype(np.int64))


def _listed_or_named(root: Path, part: str) -> tuple[list[Path], Tensor]:
    released = _released_list(root, part)
    if released is not None:
        return released
    files = image_files(root / part)
    if not files:
        raise ValueError(f"{root / part} holds no images")
    return files, torch.tensor([_label_from_name(p) for p in files])


def read_tinyface(root: str | os.PathLike) -> TinyFaceLayout:
    """TinyFace's released Testing_Set (root may be Testing_Set itself or a folder holding it). Probe and
    Gallery_Match come from the released .mat lists where they are present, else from the folders, with
    the identity read from each file name."""
    root = Path(root)
    if not (root / "Probe").is_dir() and (root / "Testing_Set").is_dir():
        root = root / "Testing_Set"
    for part in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        if not (root / part).is_dir():
            raise ValueError(f"{root} has no {part}/ folder: expected TinyFace's Testing_Set with Probe/, "
                             "Gallery_Match/ and Gallery_Distractor/")
    probe, probe_labels = _listed_or_named(root, "Probe")
    match, match_labels = _listed_or_named(root, "Gallery_Match")
    return TinyFaceLayout(probe, probe_labels, match, match_labels, image_files(root / "Gallery_Distractor"))


def tinyface(net: nn.Module, root: str | os.PathLike, resolutions: Sequence[int | None] = (None,),
             batch_size: int = 128, device: torch.device | str = "cpu", num_workers: int = 0,
             progress: bool = True) -> dict[str, dict[int, float]]:
    """{'112x112': {1: rank-1, 5: ..., 10: ..., 20: ...}, ...}: CMC over the full gallery with distractors."""
    layout = read_tinyface(root)
    gallery = layout.gallery_match + layout.distractors
    # distractors carry identity -1: no probe matches them
    gallery_labels = torch.cat([layout.gallery_labels, torch.full((len(layout.distractors),), -1)])
    out = {}
    for r in resolutions:
        kw = dict(batch_size=batch_size, transform=_transform(r), device=device, num_workers=num_workers,
                  progress=progress)
        g = embed_dataset(net, ImageListDataset(gallery, INPUT_SIZE), desc=f"TinyFace gallery {resolution_label(r)}", **kw)
        p = embed_dataset(net, ImageListDataset(layout.probe, INPUT_SIZE), desc=f"TinyFace probe {resolution_label(r)}",
                          **kw)
        out[resolution_label(r)] = cmc(g, gallery_labels, p, layout.probe_labels, RANKS)
    return out


# ---- UCCS-style ----------------------------------------------------------------------------------------

def uccs(net: nn.Module, root: str | os.PathLike, split_file: str | os.PathLike,
         resolutions: Sequence[int | None] = (16,), batch_size: int = 128, device: torch.device | str = "cpu",
         num_workers: int = 0, progress: bool = True) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """(linear-probe top-1 per resolution, CMC of test against the train images per resolution)."""
    dataset = IdentityFolderDataset(root, INPUT_SIZE, as_uint8=True)
    split = read_split_file(split_file)
    (train_idx, train_labels), (test_idx, test_labels) = split.resolve("train", dataset), split.resolve("test", dataset)
    top1, ranks = {}, {}
    for r in resolutions:
        kw = dict(batch_size=batch_size, transform=_transform(r), device=device, num_workers=num_workers,
                  progress=progress)
        train = embed_dataset(net, Subset(dataset, train_idx.tolist()), desc=f"train {resolution_label(r)}", **kw)
        test = embed_dataset(net, Subset(dataset, test_idx.tolist()), desc=f"test {resolution_label(r)}", **kw)
        top1[resolution_label(r)] = linear_probe(train, train_labels, test, test_labels)
        known = torch.isin(test_labels, train_labels)  # CMC needs every probe identity in the gallery
        if known.any():
            ranks[resolution_label(r)] = cmc(train, train_labels, test[known], test_labels[known], RANKS)
    return top1, ranks


# ---- AR-style ------------------------------------------------------------------------------------------

def read_ar(root: str | os.PathLike) -> tuple[IdentityFolderDataset, dict[str, IdentityFolderDataset], list[str]]:
    """(gallery, {subset: probes}, identity names): ROOT/gallery/<identity>/ and ROOT/<subset>/<identity>/;
    labels index the sorted identity names of all folders together."""
    root = Path(root)
    if not (root / "gallery").is_dir():
        raise ValueError(f"{root} has no gallery/ folder: expected ROOT/gallery/<identity>/ and "
                         "ROOT/<subset>/<identity>/ for each probe subset")
    folders = {p.name: IdentityFolderDataset(p, INPUT_SIZE, as_uint8=True) for p in sorted(root.iterdir()) if p.is_dir()}
    gallery = folders.pop("gallery")
    if not folders:
        raise ValueError(f"{root} has no probe subset folder beside gallery/")
    names = sorted({c for ds in (gallery, *folders.values()) for c in ds.classes})
    code = {n: i for i, n in enumerate(names)}
    for ds in (gallery, *folders.values()):  # one label space over all folders
        ds.targets = torch.tensor([code[ds.classes[int(t)]] for t in ds.targets])
    return gallery, folders, names


def ar(net: nn.Module, root: str | os.PathLike, resolutions: Sequence[int | None] = (16,), batch_size: int = 128,
       device: torch.device | str = "cpu", num_workers: int = 0,
       progress: bool = True) -> tuple[dict[str, dict[int, float]], dict[str, dict[str, dict]]]:
    """(CMC over all probes per resolution, {resolution: subset_report}) against the gallery."""
    gallery, subsets, _ = read_ar(root)
    overall, per_subset = {}, {}
    for r in resolutions:
        kw = dict(batch_size=batch_size, transform=_transform(r), device=device, num_workers=num_workers,
                  progress=progress)
        g = embed_dataset(net, gallery, desc=f"gallery {resolution_label(r)}", **kw)
        probes = {name: (embed_dataset(net, ds, desc=f"{name} {resolution_label(r)}", **kw), ds.targets)
                  for name, ds in subsets.items()}
        per_subset[resolution_label(r)] = subset_report(g, gallery.targets, probes, RANKS)
        overall[resolution_label(r)] = cmc(g, gallery.targets, torch.cat([f for f, _ in probes.values()]),
                                           torch.cat([t for _, t in probes.values()]), RANKS)
    return overall, per_subset


def write_report(out_dir: str | os.PathLike, dataset: str, arch: str, cmc_results: dict[str, dict[int, float]],
                 linear_probe_results: dict[str, float] | None = None,
                 subsets: dict[str, dict[str, dict]] | None = None) -> dict[str, Path]:
    """identification.json / .md with rows named '<arch> <resolution>'."""
    def name(label: str) -> str:
        return f"{arch} {label}"

    return write_identification_report(
        out_dir, dataset, {name(k): v for k, v in cmc_results.items()},
        None if linear_probe_results is None else {name(k): v for k, v in linear_probe_results.items()},
        None if subsets is None else {name(k): v for k, v in subsets.items()})
