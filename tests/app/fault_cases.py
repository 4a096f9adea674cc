"""A tiny two-stage run with validation, started as `gdrd-fast train` in a subprocess, for the fault tests."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from gdrd_fast import models
from gdrd_fast.data import pack_folder, write_synthetic_dataset
from gdrd_fast.train import load_checkpoint

# 6 + 4 steps, validation every 2 steps of stage 2 and at its end, a checkpoint every 3 steps
STEPS = ("stage1.optim.steps=6", "stage2.optim.steps=4")
OUTPUTS = ("stage1.pt", "stage2.pt", "student.pt", "best.pt")
ROWS = ("metrics.csv", "losses.csv")


def make_inputs(root: Path) -> dict[str, Path]:
    """A packed .rec of 3 identities x 4 faces at 112 px, a pairs .bin to validate on, the teacher's head."""
    data = write_synthetic_dataset(root / "data", num_train_identities=3, images_per_identity=4,
                                   num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2,
                                   image_size=112)
    rec, _ = pack_folder(data["train"], root / "pack" / "train.rec", progress=False)
    head = root / "teacher_head.pt"
    with torch.random.fork_rng():  # the same head in every session
        torch.manual_seed(0)
        torch.save(models.ArcFaceHead(512, 3).state_dict(), head)
    return {"rec": rec, "folder": data["train"], "pairs": data["pairs"], "head": head}


def overrides(inputs: dict[str, Path], out: Path, *extra: str, train_root: Path | None = None) -> list[str]:
    settings = [
        f"data.train_root={train_root or inputs['rec']}", "data.batch_size=4", "data.num_workers=0", "amp=none",
        "device=cpu", "allow_random_teachers=true", "backend=torch", "models.discriminative_teacher=r18",
        f"models.discriminative_teacher_head={inputs['head']}", "models.generative_teacher=diffusers",
        "models.generative_teacher_config=tiny", "models.generative_teacher_input=32", *STEPS,
        "stage2.rcd.queue_size=4", "stage2.rcd.num_negatives=3", "log_every=1", "checkpoint_every=3",
        f"output_dir={out}", f"eval.val_targets=[{inputs['pairs']}]", "eval.val_every=2", "eval.batch_size=64",
        "data.resolution=16", *extra]
    return [a for s in settings for a in ("--set", s)]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GDRD_FAST_TEST_THREADS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def command(args: list[str]) -> list[str]:
    # one torch thread: the fault tests run beside other work on small machines
    return [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from gdrd_fast.cli import main; "
            "sys.exit(main(sys.argv[1:]))", "train", *args]


def run(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(args), env=env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command(args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.02) -> bool:
    """Poll until predicate() holds (True) or the process ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    raise TimeoutError("the run neither reached the moment nor ended")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def latest_checkpoint(out: Path) -> Path | None:
    """Where a person resumes: the last stage's checkpoint that exists."""
    for name in ("stage2.pt", "stage1.pt"):
        if (out / name).is_file():
            return out / name
    return None


def rows(path: Path) -> list[tuple]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [tuple(r.values()) for r in csv.DictReader(f)]


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def outcome(out: Path) -> dict:
    """What a run leaves: every checkpoint's contents and every csv row (losses and validation metrics)."""
    return {"files": {name: load_checkpoint(out / name) if (out / name).is_file() else None for name in OUTPUTS},
            "rows": {name: rows(out / name) for name in ROWS},
            "temporary": sorted(p.name for p in out.glob(".*tmp*"))}


def differences(a: dict, b: dict) -> list[str]:
    found = [f"{name} differs" for name in OUTPUTS if not same_tensors(a["files"][name], b["files"][name])]
    found += [f"{name}: {a['rows'][name]} vs {b['rows'][name]}" for name in ROWS if a["rows"][name] != b["rows"][name]]
    if a["temporary"] != b["temporary"]:
        found.append(f"temporary files {a['temporary']} vs {b['temporary']}")
    return found
