"""Agreement of gdrd_fast's drop-ins with the peer projects' own code, on CPU (docs/switching/).

    python -m benchmarks.peers_agreement --repdistiller CHECKOUT --moco CHECKOUT [--out benchmarks/results]

CHECKOUT: a checkout of HobbitLong/RepDistiller (its crd/ package) or facebookresearch/moco (its moco/
package); their code is imported from there and never copied here. torchdistill and
pytorch-metric-learning are the installed packages. Both sides get the same inputs, banks and
negatives; results go to peers_agreement_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
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
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def repdistiller(checkout: Path, dtype: torch.dtype, steps: int = 20) -> dict:
    """RepDistiller's CRDLoss(opt) and gdrd_fast.CRDLoss(opt) from the same state, same contrast_idx."""
    memory = _import_from(checkout, "crd.memory")
    criterion = _import_from(checkout, "crd.criterion")
    memory.AliasMethod.cuda = lambda self: None  # its constructor moves the sampler to a GPU; this is CPU
    # RepDistiller keeps T in a float32 buffer: give gdrd_fast the same float32-rounded T
    t = float(torch.tensor(0.07, dtype=torch.float32))
    opt = types.SimpleNamespace(s_dim=64, t_dim=96, feat_dim=128, nce_k=4096, nce_t=t, nce_m=0.5, n_data=20000)
    theirs = criterion.CRDLoss(opt).to(dtype)
    ours = gdrd_fast.CRDLoss(opt, bank_dtype=dtype).to(dtype)
    ours.load_state_dict(theirs.state_dict())  # converted: contrast.memory_v1/v2, Z from params
    loss_err, grad_err, bank_err = [], [], []
    for _ in tqdm(range(steps), desc=f"RepDistiller {dtype}", leave=False):
        idx = torch.randperm(opt.n_data)[:64]
        contrast_idx = torch.cat([idx[:, None], torch.randint(opt.n_data, (64, opt.nce_k))], 1)
        f_s = torch.randn(64, opt.s_dim, dtype=dtype, requires_grad=True)
        f_t = torch.randn(64, opt.t_dim, dtype=dtype, requires_grad=True)
        want, got = theirs(f_s, f_t, idx, contrast_idx), ours(f_s, f_t, idx, contrast_idx)
        loss_err.append(abs(float(got.detach()) - float(want.detach())) / abs(float(want.detach())))
        grad_err.append(_max_abs(torch.autograd.grad(got, [f_s, f_t, *ours.parameters()]),
                                 torch.autograd.grad(want, [f_s, f_t, *theirs.parameters()])))
        bank_err.append(_max_abs([ours.memory_s.rows, ours.memory_t.rows],
                                 [theirs.contrast.memory_v1, theirs.contrast.memory_v2]))
    return {"steps": steps, "max_rel_loss_diff": max(loss_err), "max_abs_grad_diff": max(grad_err),
            "max_abs_bank_diff": max(bank_err)}


@contextlib.contextmanager
def _cuda_calls_stay_on_cpu():
    """MoCo's forward moves its labels with .cuda(); on a CPU-only machine they stay where they are."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def moco(checkout: Path, steps: int = 20) -> dict:
    """MoCo's builder (one gloo process for its all_gather) against MemoryQueue + infonce_bank_loss."""
    builder = _import_from(checkout, "moco.builder")
    with tempfile.TemporaryDirectory() as tmp, _cuda_calls_stay_on_cpu():
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            dim, size, batch = 128, 4096, 256
            model = builder.MoCo(lambda num_classes: torch.nn.Linear(48, num_classes), dim=dim, K=size, T=0.07)
            # its batch shuffle only serves BatchNorm (none here) and calls .cuda(): identity on CPU
            model._batch_shuffle_ddp = lambda x: (x, None)
            model._batch_unshuffle_ddp = lambda x, idx: x
            queue = gdrd_fast.MemoryQueue(size, dim, gather=True)
            queue.push_(model.queue.t())  # MoCo starts from random unit vectors: the same ones
            loss_err, grad_err = [], []
            for _ in tqdm(range(steps), desc="MoCo", leave=False):
                im_q, im_k = torch.randn(batch, 48), torch.randn(batch, 48)
                logits, labels = model(im_q, im_k)
                want = F.cross_entropy(logits, labels)
                q = F.normalize(model.encoder_q(im_q), dim=1)
                with torch.no_grad():
                    k = F.normalize(model.encoder_k(im_k), dim=1)  # the key encoder after its momentum step
                got = gdrd_fast.infonce_bank_loss(q, k, queue.filled(), temperature=0.07)
                queue.push_(k)
                loss_err.append(abs(float(got.detach()) - float(want.detach())))
                grad_err.append(_max_abs(torch.autograd.grad(got, list(model.encoder_q.parameters())),
                                         torch.autograd.grad(want, list(model.encoder_q.parameters()))))
            identical = bool(torch.equal(queue.filled(), model.queue.t()))
        finally:
            dist.destroy_process_group()
    return {"steps": steps, "max_abs_loss_diff": max(loss_err), "max_abs_grad_diff": max(grad_err),
            "queue_bit_identical": identical}


def torchdistill_crd(steps: int = 20) -> dict:
    from torchdistill.losses.mid_level import CRDLoss

    n, k, dim, batch = 20000, 4096, 128, 64
    kwargs = {"student_norm_module_path": "normalizer", "student_empty_module_path": "empty",
              "teacher_norm_module_path": "normalizer", "input_size": dim, "output_size": n,
              "num_negative_samples": k, "num_samples": n, "temperature": 0.07, "momentum": 0.5, "eps": 1e-7}
    theirs, ours = CRDLoss(**kwargs), td_integration.TorchdistillCRDLoss(**kwargs)
    ours.crd.memory_s.rows.copy_(theirs.memory_v1)
    ours.crd.memory_t.rows.copy_(theirs.memory_v2)
    loss_err = []
    for _ in tqdm(range(steps), desc="torchdistill", leave=False):
        v_s, v_t = (F.normalize(torch.randn(batch, dim), dim=1) for _ in range(2))
        idx = torch.randperm(n)[:batch]
        supp = {"pos_idx": idx, "contrast_idx": torch.cat([idx[:, None], torch.randint(n, (batch, k))], 1)}
        io = ({"normalizer": {"output": v_s}, "empty": {"input": supp}}, {"normalizer": {"output": v_t}})
        want, got = theirs(*io), ours(*io)
        loss_err.append(abs(float(got) - float(want)) / abs(float(want)))
    return {"steps": steps, "max_rel_loss_diff_fp32": max(loss_err)}


def metric_learning(steps: int = 20) -> dict:
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    dim, size, batch = 128, 1024, 96
    theirs = CrossBatchMemory(NTXentLoss(temperature=0.07), embedding_size=dim, memory_size=size)
    ours = CrossBatchNTXentLoss(embedding_size=dim, memory_size=size, temperature=0.07)
    loss_err, grad_err = [], []
    for _ in tqdm(range(steps), desc="pytorch-metric-learning", leave=False):
        emb = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
        labels = torch.arange(batch) % (batch // 2)  # two views per label, labels restarting every batch
        want, got = theirs(emb, labels), ours(emb, labels)
        loss_err.append(abs(float(got.detach()) - float(want.detach())))
        grad_err.append(_max_abs(torch.autograd.grad(got, [emb]), torch.autograd.grad(want, [emb])))
    return {"steps": steps, "max_abs_loss_diff_fp64": max(loss_err), "max_abs_grad_diff_fp64": max(grad_err)}


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
        "repdistiller": {"commit": _commit(args.repdistiller),
                         "float32": repdistiller(args.repdistiller, torch.float32),
                         "float64": repdistiller(args.repdistiller, torch.float64)},
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
