"""The frozen teachers' outputs, computed once per training image and flip, stored memory-mapped.

Both teachers are frozen and see only a training image and its horizontal flip, so every epoch would
recompute the same features. `build_cache` runs each teacher once and writes, in one folder:

* <output>.bin: a raw array [n_images, 2 flips, *shape] per output; flip 0 is the image as stored,
  flip 1 its horizontal flip. Outputs: 'tap' (T_g's feature of the LR face: stages 1 and gdrd-e2e) and
  'embedding' (T_d's embedding of the HR face: stage 2; KD's logits are the teacher head's of it).
  fp8 entries carry a per-entry float32 scale in <output>.scale.bin.
* manifest.json: what every output was computed from (teacher weights' sha256, tap, input size,
  timestep, LR degradation), the storage dtype, the dataset's fingerprint, and a sha256 of itself.
* done-rank<r>.bin: which chunks are written; a killed run resumes by computing only the others.

The trainer reads the store in its data pipeline (CachedDataset: both flips of an image, next to it),
and make_views keeps the entry of the flip it draws, so the training distribution is unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..atomic import write_bytes
from ..data import degrade, from_uint8
from .stages import DiscriminativeStage, GenerativeStage, GenerativeTarget, Stage

log = logging.getLogger("gdrd_fast.train")
FORMAT = 1
FLIPS = 2
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# storage dtype -> (numpy dtype of the raw file, torch dtype it holds)
DTYPES = {"float32": (np.float32, torch.float32), "bf16": (np.uint16, torch.bfloat16),
          "fp8": (np.uint8, getattr(torch, "float8_e4m3fn", None))}
_STORED = {torch.uint16: torch.bfloat16, torch.uint8: DTYPES["fp8"][1]}  # raw bits -> the dtype they hold
OUTPUT_NAMES = {"tap": "T_g's feature of the LR face", "embedding": "T_d's embedding of the HR face"}
KEY = "data.teacher_cache"


class StaleCacheError(ValueError):
    """A cache whose manifest does not match what the run would compute; the message names each difference."""


# --- what an output depends on ---------------------------------------------------------------------
def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): file-backed or random weights alike."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tap_spec(target: GenerativeTarget, view_args: dict) -> dict:
    """Everything T_g's cached feature of an image depends on."""
    if target.noise:
        raise ValueError("models.generative_teacher_noise > 0 draws new noise every step: its targets cannot be "
                         f"cached; set it to 0 or unset {KEY}")
    teacher = target.teacher
    return {"teacher": type(teacher).__name__, "weights_sha256": weights_sha256(teacher),
            "tap": getattr(teacher, "tap", None), "input_size": target.input_size, "timestep": target.timestep,
            "resolution": view_args["resolution"],
            "interpolation": view_args["interpolation"], "antialias": view_args["antialias"]}


def embedding_spec(teacher: nn.Module) -> dict:
    """Everything T_d's cached embedding of an image depends on (the image itself: dataset_fingerprint)."""
    return {"teacher": type(teacher).__name__, "weights_sha256": weights_sha256(teacher)}


def stage_outputs(stage: Stage, view_args: dict) -> dict[str, tuple[dict, nn.Module]]:
    """The outputs a stage reads from its teachers: name -> (spec, module computing it)."""
    outputs = {}
    target = stage.target if isinstance(stage, GenerativeStage) else getattr(stage, "generative", None)
    if target is not None:
        outputs["tap"] = (tap_spec(target, view_args), target)
    if isinstance(stage, DiscriminativeStage) and stage.teacher is not None:
        outputs["embedding"] = (embedding_spec(stage.teacher), stage.teacher)
    return outputs


def dataset_fingerprint(dataset: Dataset, samples: int = 16) -> dict:
    """The dataset's size and a few of its images (pixels and labels), hashed: cheap, and changes with the data."""
    n, digest = len(dataset), hashlib.sha256()
    for i in sorted({round(k * (n - 1) / max(1, samples - 1)) for k in range(samples)}):
        image, label, _ = dataset[i]
        digest.update(np.ascontiguousarray(image.numpy()).tobytes() + int(label).to_bytes(8, "little"))
    return {"images": n, "sha256": digest.hexdigest()}


def differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'key: X in the cache, Y here' for every leaf that differs."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the cache, {b!r} here")
    return out


# --- the store -------------------------------------------------------------------------------------
def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("sha256") != _digest(manifest):
        raise StaleCacheError(f"{KEY}: {path} was altered or is truncated (its sha256 does not match)")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    write_bytes(folder / "manifest.json", (json.dumps(manifest | {"sha256": _digest(manifest)}, indent=1,
                                                      sort_keys=True) + "\n").encode())


def file_bytes(shape, dtype: str) -> dict[str, int]:
    """Bytes per image in each file of an output: its entries (both flips), and fp8's scales."""
    sizes = {"bin": FLIPS * int(np.prod(shape)) * np.dtype(DTYPES[dtype][0]).itemsize}
    if dtype == "fp8":
        sizes["scale.bin"] = FLIPS * 4
    return sizes


def entry_bytes(shape, dtype: str) -> int:
    """Bytes per image of an output, both flips, all files."""
    return sum(file_bytes(shape, dtype).values())


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a finished cache (one to open with TeacherCache)."""
    manifest = read_manifest(Path(folder))
    return manifest is not None and manifest["complete"]


class TeacherCache:
    """An opened, complete store; `dataset_for` checks it against a stage and wraps its dataset."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise StaleCacheError(f"{KEY}: no teacher cache at {self.folder} (no manifest.json); write one with "
                                  "gdrd-fast cache-teachers")
        if not manifest["complete"]:
            raise StaleCacheError(f"{KEY}: the teacher cache at {self.folder} is incomplete; rerun gdrd-fast "
                                  "cache-teachers to finish it")
        self.manifest = manifest

    def check(self, wanted: dict[str, dict], fingerprint: dict) -> None:
        """Refuse, in one line naming every difference, a store not computed for these outputs and data."""
        problems = [f"dataset.{d}" for d in differences(self.manifest["dataset"], fingerprint)]
        for name, spec in wanted.items():
            saved = self.manifest["outputs"].get(name)
            if saved is None:
                problems.append(f"it holds no {name!r} ({OUTPUT_NAMES[name]})")
            else:
                problems += [f"{name}.{d}" for d in differences(saved["spec"], spec)]
        if problems:
            raise StaleCacheError(f"{KEY}: the teacher cache at {self.folder} was computed for another run: "
                                  + "; ".join(problems))

    def dataset_for(self, stage: Stage, dataset: Dataset, view_args: dict) -> Dataset:
        """`dataset` with the cached outputs `stage` uses beside every image (itself if it uses none)."""
        wanted = {name: spec for name, (spec, _) in stage_outputs(stage, view_args).items()}
        if not wanted:
            return dataset
        self.check(wanted, dataset_fingerprint(dataset))
        log.info("%s: reading %s from the teacher cache %s", stage.name, " and ".join(wanted), self.folder)
        return CachedDataset(dataset, self.folder, {n: self.manifest["outputs"][n] for n in wanted},
                             self.manifest["dtype"])


def _open_arrays(folder: Path, name: str, entry: dict, dtype: str, n: int, mode: str):
    data = np.memmap(folder / f"{name}.bin", DTYPES[dtype][0], mode, shape=(n, FLIPS, *entry["shape"]))
    scale = np.memmap(folder / f"{name}.scale.bin", np.float32, mode, shape=(n, FLIPS)) if dtype == "fp8" else None
    return data, scale


class CachedDataset(Dataset):
    """(image, label, index, {output: both flips' entries in storage dtype [, output.scale]}); the arrays are
    mapped lazily in the process that reads (DataLoader workers, ranks)."""

    def __init__(self, dataset: Dataset, folder: Path, outputs: dict[str, dict], dtype: str):
        self.dataset, self.folder, self.outputs, self.dtype = dataset, folder, outputs, dtype
        self._arrays = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self):
        return self.dataset.targets

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_arrays": None}

    def __getitem__(self, i: int):
        if self._arrays is None:
            self._arrays = {name: _open_arrays(self.folder, name, entry, self.dtype, len(self.dataset), "r")
                            for name, entry in self.outputs.items()}
        image, label, index = self.dataset[i]
        cached = {}
        for name, (data, scale) in self._arrays.items():
            cached[name] = torch.from_numpy(np.array(data[i]))
            if scale is not None:
                cached[name + ".scale"] = torch.from_numpy(np.array(scale[i]))
        return image, label, index, cached


def encode(values: Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [..., *shape] -> (raw storage array, per-entry fp8 scale or None)."""
    if dtype == "float32":
        return values.float().numpy(), None
    if dtype == "bf16":
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    scale = (values.flatten(2).abs().amax(-1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (values / scale.view(*scale.shape, *[1] * (values.dim() - scale.dim()))).to(DTYPES["fp8"][1])
    return q.view(torch.uint8).numpy(), scale.numpy()


def decode(raw: Tensor, scale: Tensor | None) -> Tensor:
    """Stored entries back to float32; the raw dtype says the storage (float32, bf16 bits, fp8 bits + scale)."""
    values = raw.view(_STORED[raw.dtype]).float() if raw.dtype in _STORED else raw.float()
    if scale is not None:
        values = values * scale.view(*scale.shape, *[1] * (values.dim() - scale.dim()))
    return values


def pick_flip(cached: dict[str, Tensor], flipped: Tensor | None) -> dict[str, Tensor]:
    """Each output's entry for the flip drawn (flipped: bool [B], or None without flips), in float32."""
    out = {}
    for name in (n for n in cached if not n.endswith(".scale")):
        raw, scale = cached[name], cached.get(name + ".scale")
        rows = torch.arange(raw.shape[0], device=raw.device)
        choice = flipped.long() if flipped is not None else torch.zeros_like(rows)
        out[name] = decode(raw[rows, choice], scale[rows, choice] if scale is not None else None)
    return out


# --- writing ---------------------------------------------------------------------------------------
def _views(images: Tensor, flip: bool, view_args: dict) -> tuple[Tensor, Tensor]:
    """(hr, lr) of a batch, as make_views builds them for a drawn flip."""
    hr = images.flip(-1) if flip else images
    r = view_args["resolution"]
    lr = hr if r is None else degrade(hr, r, mode=view_args["interpolation"], antialias=view_args["antialias"])
    return hr, lr


@torch.no_grad()
def compute(outputs: dict[str, tuple[dict, nn.Module]], images: Tensor, view_args: dict) -> dict[str, Tensor]:
    """Each output of a batch of images, [B, 2 flips, *shape], in float32 on the images' device."""
    per_flip = {name: [] for name in outputs}
    for flip in (False, True):
        hr, lr = _views(images, flip, view_args)
        for name, (_, module) in outputs.items():
            per_flip[name].append(module.features(lr) if name == "tap" else module(hr).float())
    return {name: torch.stack(values, 1) for name, values in per_flip.items()}


def _load_images(dataset: Dataset, indices: range, device) -> Tensor:
    images = torch.stack([dataset[i][0] for i in indices]).to(device)
    return from_uint8(images) if images.dtype == torch.uint8 else images


def _done_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("done-rank*.bin"))


def chunks_done(folder: Path, n_chunks: int) -> np.ndarray:
    done = np.zeros(n_chunks, dtype=bool)
    for path in _done_paths(folder):
        flags = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if len(flags) == n_chunks:
            done |= flags.astype(bool)
    return done


def error_report(outputs, dataset: Dataset, folder: Path, manifest: dict, view_args: dict, device,
                 samples: int = 16) -> dict:
    """max / mean absolute and relative (sum |err| / sum |ref|) error of the stored entries against the
    float32 teachers, on `samples` images spread over the dataset (both flips)."""
    n, report = len(dataset), {}
    picks = sorted({round(k * (n - 1) / max(1, samples - 1)) for k in range(samples)})
    reference = compute(outputs, torch.cat([_load_images(dataset, range(i, i + 1), device) for i in picks]),
                        view_args)
    for name, ref in reference.items():
        data, scale = _open_arrays(folder, name, manifest["outputs"][name], manifest["dtype"], n, "r")
        stored = decode(torch.from_numpy(np.array(data[picks])),
                        torch.from_numpy(np.array(scale[picks])) if scale is not None else None)
        err = (stored - ref.cpu()).abs()
        report[name] = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                        "relative": float(err.sum() / ref.abs().sum().clamp_min(1e-30)), "images": len(picks)}
    return report


def build_cache(folder: str | os.PathLike, outputs: dict[str, tuple[dict, nn.Module]], dataset: Dataset,
                view_args: dict, dtype: str = "bf16", chunk: int = 64, device="cpu", rank: int = 0,
                world_size: int = 1, progress: bool = True) -> dict:
    """Write (or finish, or confirm) the cache of `outputs` (stage_outputs) over `dataset`; returns the manifest.

    Chunk c of `chunk` images is computed by rank c mod world_size, written, flushed, and only then marked
    done, so a killed run resumes where it stopped and ends with the bytes of an uninterrupted one."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if DTYPES[dtype][1] is None:
        raise ValueError(f"dtype fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks")
    if not outputs:
        raise ValueError("no teacher output to cache: this variant distils no frozen teacher")
    folder, n = Path(folder), len(dataset)
    n_chunks = -(-n // chunk)
    manifest = {"format": FORMAT, "dtype": dtype, "chunk": chunk, "flips": ["none", "horizontal"],
                "dataset": dataset_fingerprint(dataset), "complete": False,
                "outputs": {name: {"spec": spec, "shape": None} for name, (spec, _) in outputs.items()}}
    probe = compute(outputs, _load_images(dataset, range(min(1, n)), device), view_args)
    for name, values in probe.items():
        manifest["outputs"][name]["shape"] = list(values.shape[2:])
    saved = read_manifest(folder)
    if saved is not None:
        keys = ("format", "dtype", "chunk", "dataset", "outputs")
        diff = differences({k: saved[k] for k in keys}, {k: manifest[k] for k in keys})
        if diff:
            raise StaleCacheError(f"{KEY}: {folder} holds a teacher cache computed for another run ("
                                  + "; ".join(diff) + "); choose another folder or delete it")
        if saved["complete"]:
            log.info("teacher cache %s is complete: nothing to do", folder)
            return saved
    total = sum(n * entry_bytes(e["shape"], dtype) for e in manifest["outputs"].values())
    if rank == 0:
        line = (f"teacher cache: {n} images x {FLIPS} flips of " + ", ".join(
            f"{k} {e['shape']}" for k, e in manifest["outputs"].items()) + f" in {dtype}: {total / 2 ** 30:.3f} GiB "
            f"in {folder}")
        log.info("%s", line)
        if progress:
            tqdm.write(line)
        folder.mkdir(parents=True, exist_ok=True)
        if saved is None:  # a new cache: nothing of a run whose manifest never got written is trusted
            for path in _done_paths(folder):
                path.unlink()
        for name, entry in manifest["outputs"].items():
            for suffix, size in file_bytes(entry["shape"], dtype).items():
                path = folder / f"{name}.{suffix}"
                if saved is None or not path.is_file():
                    with open(path, "wb") as f:
                        f.truncate(n * size)
        if saved is None:
            write_manifest(folder, manifest)
    if world_size > 1:
        dist.barrier()
    arrays = {name: _open_arrays(folder, name, entry, dtype, n, "r+") for name, entry in manifest["outputs"].items()}
    done = chunks_done(folder, n_chunks)
    flags = done.astype(np.uint8)  # this rank's file also carries what earlier runs finished
    todo = [c for c in range(rank, n_chunks, world_size) if not done[c]]
    own = folder / f"done-rank{rank}.bin"
    for c in tqdm(todo, desc="cache-teachers", unit="chunk", disable=not (progress and rank == 0),
                  dynamic_ncols=True):
        indices = range(c * chunk, min(n, (c + 1) * chunk))
        values = compute(outputs, _load_images(dataset, indices, device), view_args)
        for name, (data, scale) in arrays.items():
            raw, scales = encode(values[name].cpu(), dtype)
            data[indices.start:indices.stop] = raw
            data.flush()
            if scale is not None:
                scale[indices.start:indices.stop] = scales
                scale.flush()
        flags[c] = 1
        write_bytes(own, flags.tobytes())
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        missing = int((~chunks_done(folder, n_chunks)).sum())
        if missing:
            raise RuntimeError(f"teacher cache {folder}: {missing} chunk(s) were not written")
        manifest["error"] = error_report(outputs, dataset, folder, manifest, view_args, device)
        manifest["complete"] = True
        write_manifest(folder, manifest)
        for name, err in manifest["error"].items():
            log.info("teacher cache %s (%s) against the float32 teacher: max abs %.3g, mean abs %.3g, relative %.3g",
                     name, dtype, err["max_abs"], err["mean_abs"], err["relative"])
    if world_size > 1:
        dist.barrier()
    return read_manifest(folder)
