"""Agreement of gdrd_fast's drop-ins with the peer projects' own code at their defaults, on CPU (docs/switching/).

    python -m benchmarks.peers_agreement --repdistiller CHECKOUT --moco CHECKOUT [--out benchmarks/results]

CHECKOUT: a checkout of HobbitLong/RepDistiller (its crd/ package) or facebookresearch/moco (its moco/
package); their code is imported from there and never copied here. torchdistill and
pytorch-metric-learning are the installed packages. Both sides get the same inputs, banks and
negatives. Each float32 result is measured against the peer's own code run in float64, next to the
peer's own float32 result, so a gap that is float32's shows as such; results go to
peers_agreement_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import types
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import gdrd_fast
from gdrd_fast.integrations import moco as moco_integration
from gdrd_fast.integrations import torchdistill as td_integration
from gdrd_fast.integrations.metric_learning import CrossBatchNTXentLoss


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PEER_COMMIT", "unknown (not a git checkout; set PEER_COMMIT)")


def _import_from(checkout: Path, module: str):
    sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(checkout))


def _max_abs(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def _rel(got, want) -> float:
    return abs(float(got.detach()) - float(want.detach())) / abs(float(want.detach()))


def _worst(rows: list[dict]) -> dict:
    return {key: max(row[key] for row in rows) for key in rows[0]}


def repdistiller(checkout: Path, steps: int = 5) -> dict:
    """RepDistiller's CRDLoss(opt) at train_student.py's defaults (nce_k 16384, nce_t 0.07, nce_m 0.5,
    feat_dim 128, batch 64; CIFAR-100's 50,000 rows; resnet32x4 -> resnet8x4's 256-wide features).
    gdrd_fast float32 and RepDistiller float32 from one state, both against RepDistiller in float64."""
    memory = _import_from(checkout, "crd.memory")
    criterion = _import_from(checkout, "crd.criterion")
    memory.AliasMethod.cuda = lambda self: None  # its constructor moves the sampler to a GPU; this is CPU
    # RepDistiller keeps T in a float32 buffer: give gdrd_fast the same float32-rounded T
    t = float(torch.tensor(0.07, dtype=torch.float32))
    opt = types.SimpleNamespace(s_dim=256, t_dim=256, feat_dim=128, nce_k=16384, nce_t=t, nce_m=0.5, n_data=50000)
    theirs = criterion.CRDLoss(opt)
    theirs64 = copy.deepcopy(theirs).double()
    ours = gdrd_fast.CRDLoss(opt)
    ours.load_state_dict(theirs.state_dict())  # converted: contrast.memory_v1/v2, Z from params
    rows = []
    for _ in tqdm(range(steps), desc="RepDistiller", leave=False):
        idx = torch.randperm(opt.n_data)[:64]
        contrast_idx = torch.cat([idx[:, None], torch.randint(opt.n_data, (64, opt.nce_k))], 1)
        f_s, f_t = torch.randn(64, opt.s_dim, dtype=torch.float64), torch.randn(64, opt.t_dim, dtype=torch.float64)
        out = {}
        for name, model, dtype in (("ref", theirs64, torch.float64), ("theirs", theirs, torch.float32),
                                   ("ours", ours, torch.float32)):
            x_s, x_t = f_s.to(dtype).requires_grad_(True), f_t.to(dtype).requires_grad_(True)
            loss = model(x_s, x_t, idx, contrast_idx)
            out[name] = (loss, torch.autograd.grad(loss, [x_s, x_t]))
        rows.append({"gdrd_fast_fp32_rel_loss_vs_fp64": _rel(out["ours"][0], out["ref"][0]),
                     "repdistiller_fp32_rel_loss_vs_fp64": _rel(out["theirs"][0], out["ref"][0]),
                     "gdrd_fast_fp32_abs_grad_vs_fp64": _max_abs(out["ours"][1], out["ref"][1]),
                     "repdistiller_fp32_abs_grad_vs_fp64": _max_abs(out["theirs"][1], out["ref"][1])})
    return {"config": "K=16384 T=0.07 m=0.5 feat_dim=128 B=64 N=50000 dims=256", "steps": steps, **_worst(rows)}


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu():
    """MoCo's forward moves its labels with .cuda(); on a CPU-only machine they stay where they are."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def _moco_accuracy(output, target):
    """main_moco.py's accuracy(output, target, topk=(1, 5)), as it reads the logits' topk."""
    _, best = output.topk(5, 1, True, True)
    hit = best.t() == target.view(1, -1)
    return [float(hit[:k].reshape(-1).float().sum()) * 100.0 / target.size(0) for k in (1, 5)]


def moco(checkout: Path, steps: int = 5) -> dict:
    """MoCo's builder at main_moco.py's defaults (K 65536, dim 128, T 0.07, m 0.999; B 256), one gloo
    process for its all_gather: its float32 logits path and the fused switch (integrations.moco.fuse)
    against its logits path in float64; Acc@1/Acc@5 compared as main_moco.py computes them."""
    builder = _import_from(checkout, "moco.builder")
    with tempfile.TemporaryDirectory() as tmp, _cuda_calls_stay_on_cpu():
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            theirs = builder.MoCo(lambda num_classes: torch.nn.Linear(48, num_classes), dim=128, K=65536,
                                  m=0.999, T=0.07)
            # its batch shuffle only serves BatchNorm (none here): identity, so all three see one order
            theirs._batch_shuffle_ddp = lambda x: (x, None)
            theirs._batch_unshuffle_ddp = lambda x, idx: x
            theirs64, ours = copy.deepcopy(theirs).double(), copy.deepcopy(theirs)
            criterion = moco_integration.fuse(ours)
            rows, meters_equal = [], True
            for _ in tqdm(range(steps), desc="MoCo", leave=False):
                im_q, im_k = torch.randn(256, 48, dtype=torch.float64), torch.randn(256, 48, dtype=torch.float64)
                out = {}
                for name, model, dtype in (("ref", theirs64, torch.float64), ("theirs", theirs, torch.float32),
                                           ("ours", ours, torch.float32)):
                    output, target = model(im_q.to(dtype), im_k.to(dtype))
                    loss = criterion(output, target) if name == "ours" else F.cross_entropy(output, target)
                    grads = torch.autograd.grad(loss, list(model.encoder_q.parameters()))
                    out[name] = (loss, grads, _moco_accuracy(output, target))
                meters_equal &= out["ours"][2] == out["theirs"][2]
                rows.append({"gdrd_fast_fp32_abs_loss_vs_fp64": _max_abs([out["ours"][0]], [out["ref"][0]]),
                             "moco_fp32_abs_loss_vs_fp64": _max_abs([out["theirs"][0]], [out["ref"][0]]),
                             "gdrd_fast_fp32_abs_grad_vs_fp64": _max_abs(out["ours"][1], out["ref"][1]),
                             "moco_fp32_abs_grad_vs_fp64": _max_abs(out["theirs"][1], out["ref"][1])})
            identical = bool(torch.equal(ours.moco_queue.filled(), theirs.queue.t()))
        finally:
            dist.destroy_process_group()
    return {"config": "K=65536 dim=128 T=0.07 m=0.999 B=256", "steps": steps, **_worst(rows),
            "acc1_acc5_equal_to_mocos_fp32": meters_equal, "queue_bit_identical_to_mocos_fp32": identical}


def torchdistill_crd(steps: int = 5) -> dict:
    """torchdistill's CRDLoss at its defaults (T 0.07, momentum 0.5, eps 1e-7) and its CRD config's
    K = 16384, B = 64, N = 50,000 (ImageNet's 1.28M rows take its constructor minutes): gdrd_fast's key
    and torchdistill in float32, against torchdistill in float64, from the same seed (same banks)."""
    from torchdistill.losses.mid_level import CRDLoss

    n, k, dim, batch = 50000, 16384, 128, 64
    kwargs = {"student_norm_module_path": "normalizer", "student_empty_module_path": "empty",
              "teacher_norm_module_path": "normalizer", "input_size": dim, "output_size": n,
              "num_negative_samples": k, "num_samples": n, "temperature": 0.07, "momentum": 0.5, "eps": 1e-7}
    torch.manual_seed(1)
    theirs = CRDLoss(**kwargs)
    torch.manual_seed(1)
    ours = td_integration.TorchdistillCRDLoss(**kwargs)
    same_banks = bool(torch.equal(ours.crd.memory_s.rows, theirs.memory_v1)
                      and torch.equal(ours.crd.memory_t.rows, theirs.memory_v2))
    theirs64 = copy.deepcopy(theirs).double()
    rows = []
    for _ in tqdm(range(steps), desc="torchdistill", leave=False):
        v_s, v_t = (F.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=1) for _ in range(2))
        idx = torch.randperm(n)[:batch]
        supp = {"pos_idx": idx, "contrast_idx": torch.cat([idx[:, None], torch.randint(n, (batch, k))], 1)}
        out = {}
        for name, model, dtype in (("ref", theirs64, torch.float64), ("theirs", theirs, torch.float32),
                                   ("ours", ours, torch.float32)):
            io = ({"normalizer": {"output": v_s.to(dtype)}, "empty": {"input": supp}},
                  {"normalizer": {"output": v_t.to(dtype)}})
            out[name] = model(*io)
        rows.append({"gdrd_fast_fp32_rel_loss_vs_fp64": _rel(out["ours"], out["ref"]),
                     "torchdistill_fp32_rel_loss_vs_fp64": _rel(out["theirs"], out["ref"])})
    return {"config": "K=16384 T=0.07 m=0.5 eps=1e-7 B=64 N=50000 dim=128", "steps": steps,
            "same_seed_same_banks": same_banks, **_worst(rows)}


def metric_learning(steps: int = 20) -> dict:
    """CrossBatchMemory(NTXentLoss()) at PML's defaults (memory_size 1024, T 0.07), dim 128, B 96 (48
    two-view labels restarting every batch): float64 and float32 against PML in float64, float16 against
    PML in float16 (PML's per-pair floor depends on the dtype)."""
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    dim, size, batch = 128, 1024, 96
    sides = {(who, dtype): (CrossBatchMemory(NTXentLoss(temperature=0.07), embedding_size=dim, memory_size=size)
                            if who == "pml" else CrossBatchNTXentLoss(embedding_size=dim, memory_size=size))
             for who in ("pml", "ours") for dtype in (torch.float64, torch.float32, torch.float16)}
    rows = []
    for _ in tqdm(range(steps), desc="pytorch-metric-learning", leave=False):
        emb = torch.randn(batch, dim, dtype=torch.float64)
        labels = torch.arange(batch) % (batch // 2)
        out = {}
        for (who, dtype), loss_fn in sides.items():
            x = emb.to(dtype).requires_grad_(True)
            loss = loss_fn(x, labels)
            out[who, dtype] = (loss, torch.autograd.grad(loss, [x]))
        ref = out["pml", torch.float64]
        rows.append({"gdrd_fast_fp64_abs_loss": _max_abs([out["ours", torch.float64][0]], [ref[0]]),
                     "gdrd_fast_fp64_abs_grad": _max_abs(out["ours", torch.float64][1], ref[1]),
                     "gdrd_fast_fp32_abs_loss_vs_pml_fp64": _max_abs([out["ours", torch.float32][0]], [ref[0]]),
                     "pml_fp32_abs_loss_vs_pml_fp64": _max_abs([out["pml", torch.float32][0]], [ref[0]]),
                     "gdrd_fast_fp16_rel_loss_vs_pml_fp16": _rel(out["ours", torch.float16][0],
                                                                 out["pml", torch.float16][0])})
    return {"config": "memory_size=1024 T=0.07 dim=128 B=96", "steps": steps, **_worst(rows)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", type=Path, required=True)
    parser.add_argument("--moco", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    machine = f"{platform.machine()}-{os.cpu_count()}-cores"
    results = {
        "machine": machine, "torch": torch.__version__,
        "repdistiller": {"commit": _commit(args.repdistiller), **repdistiller(args.repdistiller)},
        "moco": {"commit": _commit(args.moco), **moco(args.moco)},
        "torchdistill": {"version": metadata.version("torchdistill"), **torchdistill_crd()},
        "pytorch-metric-learning": {"version": metadata.version("pytorch-metric-learning"), **metric_learning()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"peers_agreement_{machine}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| project | code | measure | value |", "|---|---|---|---|"]
    for project, res in results.items():
        if not isinstance(res, dict):
            continue
        code = res.get("commit", res.get("version"))
        for key, value in res.items():
            if key in ("commit", "version"):
                continue
            for measure, v in (value.items() if isinstance(value, dict) else [(key, value)]):
                label = f"{key} {measure}" if isinstance(value, dict) else measure
                rows.append(f"| {project} | `{code}` | {label} | {v:.3g} |" if isinstance(v, float)
                            else f"| {project} | `{code}` | {label} | {v} |")
    stem.with_suffix(".md").write_text(f"# Agreement with the peer projects' code ({machine}, torch "
                                       f"{torch.__version__})\n\n" + "\n".join(rows) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
