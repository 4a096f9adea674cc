"""The "Switching from ..." pages (docs/switching/): each page's snippet runs as written, against a
minimal re-implementation of the peer project's formula written here (no peer code is copied)."""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gloo_ranks import run_ranks

PAGES = Path(__file__).resolve().parents[2] / "docs" / "switching"


def snippet(page: str) -> str:
    """The page's runnable code: its python blocks, in order, but for those that open with a comment
    (a "was:" line shown for comparison)."""
    blocks = re.findall(r"```python\n(.*?)```", (PAGES / page).read_text(), flags=re.DOTALL)
    code = "\n".join(b for b in blocks if not b.startswith("#"))
    assert code, f"{page} has no runnable python block"
    return code


def run_snippet(page: str, **names) -> dict:
    namespace = dict(names)
    exec(compile(snippet(page), str(PAGES / page), "exec"), namespace)  # noqa: S102 (our own docs)
    return namespace


# ---------------------------------------------------------------------------------------------------
# MoCo
# ---------------------------------------------------------------------------------------------------
def moco_formula(q, k, queue, temperature=0.07):
    """MoCo's loss and meters: cross-entropy of [q.k, q.queue] / T with target 0, and the percentage of
    rows whose column 0 is among the logits' top 1 and top 5."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / temperature
    best = logits.topk(5, 1).indices
    hits = [(best[:, :n] == 0).any(1).float().mean() * 100 for n in (1, 5)]
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long)), *hits


def _moco_batches(steps, world, batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [[(F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1),
              F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1))
             for _ in range(world)] for _ in range(steps)]


def _moco_run(rank, world, batches, size, dim):
    """(per-step |ours - MoCo|, |dq ours - dq MoCo|, meters equal, MoCo's initial queue, the final queue)."""
    torch.manual_seed(5)  # every rank draws the same initial queue, as DDP's broadcast gives MoCo's
    ns = run_snippet("moco.md", K=size, dim=dim)
    torch.manual_seed(5)
    moco_queue = F.normalize(torch.randn(dim, size), dim=0).t().double()  # MoCo's own initial queue
    initial = ns["queue"].filled().clone()
    loss_err, grad_err, meters_equal = [], [], []
    for step in batches:
        q, k = step[rank][0].clone().requires_grad_(), step[rank][1]
        ours, acc1, acc5 = ns["moco_loss"](q, k)
        want, want1, want5 = moco_formula(q, k, moco_queue)
        (g_ours,) = torch.autograd.grad(ours, q)
        (g_want,) = torch.autograd.grad(want, q)
        loss_err.append(abs(float(ours.detach()) - float(want.detach())))
        grad_err.append(float((g_ours - g_want).abs().max()))
        meters_equal.append(float(acc1) == float(want1) and float(acc5) == float(want5))
        # MoCo enqueues all ranks' keys (concat_all_gather, rank order) into a float32 buffer
        keys = torch.cat([s[1] for s in step]).float().double()
        moco_queue = torch.cat([moco_queue, keys])[-size:]
    return loss_err, grad_err, meters_equal, initial, ns["queue"].filled().clone()


def test_moco_snippet_gives_mocos_loss_and_meters_from_mocos_initial_queue():
    size, dim = 12, 5
    batches = _moco_batches(6, 1, 4, dim, int(torch.randint(2 ** 31, (1,))))
    loss_err, grad_err, meters_equal, initial, queue = _moco_run(0, 1, batches, size, dim)
    assert max(loss_err) < 1e-12 and max(grad_err) < 1e-12 and all(meters_equal)
    torch.manual_seed(5)
    assert torch.equal(initial, F.normalize(torch.randn(dim, size), dim=0).t())
    assert torch.equal(queue.double().sort(0).values,
                       torch.cat([s[0][1] for s in batches]).float().double()[-size:].sort(0).values)


@pytest.mark.distributed
def test_moco_snippet_under_two_gloo_processes_gathers_keys_in_rank_order(tmp_path):
    size, dim, world = 16, 5, 2
    batches = _moco_batches(5, world, 4, dim, int(torch.randint(2 ** 31, (1,))))
    results = run_ranks(_moco_run, (world, batches, size, dim), world, tmp_path)
    for loss_err, grad_err, meters_equal, _, _ in results:
        assert max(loss_err) < 1e-12 and max(grad_err) < 1e-12 and all(meters_equal)
    assert torch.equal(results[0][4], results[1][4])  # every rank holds the same queue
    keys = torch.cat([k for step in batches for _, k in step]).float()
    assert torch.equal(results[0][4], torch.roll(keys[-size:], len(keys) % size, 0))  # ring slot order


def test_memory_queue_labels_are_opt_in_and_filled_grows():
    from gdrd_fast import MemoryQueue

    queue = MemoryQueue(5, 3)
    assert queue.labels is None and queue.filled().shape == (0, 3)
    rows = torch.randn(7, 3)
    queue.push_(rows[:2])
    assert torch.equal(queue.filled(), rows[:2]) and queue.filled().data_ptr() == queue.values.data_ptr()
    state = {k: v.clone() for k, v in queue.state_dict().items()}
    with pytest.raises(ValueError, match="with_labels=True"):
        queue.push_(rows[:1], torch.tensor([3]))
    assert all(torch.equal(v, state[k]) for k, v in queue.state_dict().items())
    queue.push_(rows[2:7])  # wraps: slots hold rows 5, 6, 2, 3, 4
    assert torch.equal(queue.filled(), torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    assert torch.equal(queue.filled(skip_newest=2), rows[2:5])  # oldest first
    with pytest.raises(ValueError, match="skip_newest"):
        queue.filled(skip_newest=6)
    labelled = MemoryQueue(4, 2, with_labels=True)
    labelled.push_(torch.randn(3, 2), torch.tensor([7, 8, 9]))
    assert torch.equal(labelled.filled_labels(), torch.tensor([7, 8, 9]))
    assert torch.equal(labelled.filled_labels(skip_newest=1), torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="no labels"):
        queue.filled_labels()



# ---------------------------------------------------------------------------------------------------
# RepDistiller
# ---------------------------------------------------------------------------------------------------
class _RepDistillerStyleEmbed(torch.nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = torch.nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


class RepDistillerStyleCRD(torch.nn.Module):
    """RepDistiller's CRD formulas, re-written: state under its names (contrast.params = [K, T, Z_v1, Z_v2,
    momentum], Z = -1 until set; memory_v1 = student bank, memory_v2 = teacher bank)."""

    def __init__(self, opt, dtype=torch.float32):
        super().__init__()
        self.embed_s = _RepDistillerStyleEmbed(opt.s_dim, opt.feat_dim)
        self.embed_t = _RepDistillerStyleEmbed(opt.t_dim, opt.feat_dim)
        self.contrast = torch.nn.Module()
        # float32 in RepDistiller, so T is 0.07 rounded to float32 there; float64 runs build it in float64
        self.contrast.register_buffer("params", torch.tensor([opt.nce_k, opt.nce_t, -1.0, -1.0, opt.nce_m],
                                                             dtype=dtype))
        bound = 1 / (opt.feat_dim / 3) ** 0.5
        for name in ("memory_v1", "memory_v2"):
            self.contrast.register_buffer(name, torch.rand(opt.n_data, opt.feat_dim) * 2 * bound - bound)
        self.n_data = opt.n_data
        self.to(dtype)

    def nce(self, p):
        """-(log P0/(P0 + K/N + eps) + sum_k log (K/N)/(Pk + K/N + eps)) / B"""
        c, eps = (p.shape[1] - 1) / self.n_data, 1e-7
        return -(torch.log(p[:, 0] / (p[:, 0] + c + eps)).sum() + torch.log(c / (p[:, 1:] + c + eps)).sum()) / len(p)

    def forward(self, f_s, f_t, idx, contrast_idx):
        v1, v2 = self.embed_s(f_s), self.embed_t(f_t)
        mem = self.contrast
        _, temperature, _, _, momentum = mem.params.tolist()
        out_v1 = torch.exp(torch.einsum("bkd,bd->bk", mem.memory_v2[contrast_idx], v1) / temperature)
        out_v2 = torch.exp(torch.einsum("bkd,bd->bk", mem.memory_v1[contrast_idx], v2) / temperature)
        if mem.params[2] < 0:  # Z on the first batch
            mem.params[2] = out_v1.mean().detach() * self.n_data
        if mem.params[3] < 0:
            mem.params[3] = out_v2.mean().detach() * self.n_data
        z_v1, z_v2 = mem.params[2].item(), mem.params[3].item()
        with torch.no_grad():
            for bank, v in ((mem.memory_v1, v1), (mem.memory_v2, v2)):
                row = bank[idx] * momentum + v * (1 - momentum)
                bank[idx] = row / row.pow(2).sum(1, keepdim=True).sqrt()
        return self.nce(out_v1 / z_v1) + self.nce(out_v2 / z_v2)


def _crd_opt():
    import types

    return types.SimpleNamespace(s_dim=11, t_dim=13, feat_dim=16, nce_k=37, nce_t=0.07, nce_m=0.5, n_data=101)


def _crd_step(opt, batch=9, dtype=torch.float64):
    idx = torch.randperm(opt.n_data)[:batch]
    contrast_idx = torch.cat([idx[:, None], torch.randint(opt.n_data, (batch, opt.nce_k))], 1)
    return (torch.randn(batch, opt.s_dim, dtype=dtype, requires_grad=True),
            torch.randn(batch, opt.t_dim, dtype=dtype, requires_grad=True), idx, contrast_idx)


def _theirs_after_two_steps(opt, dtype):
    theirs = RepDistillerStyleCRD(opt, dtype)
    for _ in range(2):  # Z set on the first step, banks moved by both
        theirs(*_crd_step(opt, dtype=dtype))
    return theirs


def _same_next_step(ours, theirs, opt, dtype, tol):
    assert float(ours.log_z_s) == pytest.approx(math.log(theirs.contrast.params[2].item()), rel=1e-12)
    assert float(ours.log_z_t) == pytest.approx(math.log(theirs.contrast.params[3].item()), rel=1e-12)
    for backend in ("torch", "auto"):
        ours.backend = backend
        ours_step, their_step = copy.deepcopy(ours), copy.deepcopy(theirs)
        f_s, f_t, idx, contrast_idx = _crd_step(opt, dtype=dtype)
        want = their_step(f_s, f_t, idx, contrast_idx)
        got = ours_step(f_s, f_t, idx, contrast_idx)
        assert abs(float(got.detach()) - float(want.detach())) <= tol * max(1.0, abs(float(want.detach())))
        g_want = torch.autograd.grad(want, [f_s, f_t, *their_step.parameters()])
        g_got = torch.autograd.grad(got, [f_s, f_t, *ours_step.parameters()])
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch.testing.assert_close(ours_step.memory_s.rows, their_step.contrast.memory_v1, rtol=tol, atol=tol)
        torch.testing.assert_close(ours_step.memory_t.rows, their_step.contrast.memory_v2, rtol=tol, atol=tol)


def test_repdistiller_snippet_resumes_a_repdistiller_state_with_the_same_next_step():
    opt = _crd_opt()
    theirs = _theirs_after_two_steps(opt, torch.float32)
    ns = run_snippet("repdistiller.md", opt=opt, repdistiller_criterion=theirs)
    _same_next_step(ns["criterion_kd"], theirs, opt, torch.float32, 1e-5)


def test_repdistiller_state_converts_exactly_in_float64():
    import gdrd_fast

    opt = _crd_opt()
    theirs = _theirs_after_two_steps(opt, torch.float64)
    ours = gdrd_fast.CRDLoss(opt, bank_dtype=torch.float64).double()
    ours.load_state_dict(theirs.state_dict())
    _same_next_step(ours, theirs, opt, torch.float64, 1e-12)


def test_repdistiller_state_conversion_checks_opt_and_keeps_unset_z():
    import gdrd_fast

    opt = _crd_opt()
    fresh = RepDistillerStyleCRD(opt)
    ours = gdrd_fast.CRDLoss(opt)
    ours.load_state_dict(fresh.state_dict())  # Z = -1: not set yet
    assert torch.isnan(ours.log_z_s) and torch.isnan(ours.log_z_t)
    assert torch.equal(ours.memory_s.rows, fresh.contrast.memory_v1)
    other = copy.copy(opt)
    other.nce_t = 0.1
    with pytest.raises(ValueError, match="nce_t=0.1"):
        gdrd_fast.CRDLoss(other).load_state_dict(fresh.state_dict())
    state = fresh.state_dict()
    del state["contrast.memory_v2"]
    with pytest.raises(KeyError, match="memory_v2"):
        ours.load_state_dict(state)
    with pytest.raises(TypeError, match="opt has no nce_k"):
        gdrd_fast.CRDLoss(types_namespace(s_dim=3, t_dim=4, n_data=5, feat_dim=2, nce_t=0.1, nce_m=0.5))


def _commented_block(page: str, first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (PAGES / page).read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


def test_repdistiller_page_diff_is_its_claimed_one_line_and_gives_gdrd_fasts_crd():
    """The diff's removed line is train_student.py's import of RepDistiller's CRDLoss; applied to that
    import and the unchanged `criterion_kd = CRDLoss(opt)` it builds gdrd_fast's CRDLoss."""
    import gdrd_fast

    page = (PAGES / "repdistiller.md").read_text()
    (diff,) = re.findall(r"```diff\n(.*?)```", page, flags=re.DOTALL)
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    claimed = int(re.search(r"\*\*(\d+) changed lines?\*\*", page).group(1))
    assert claimed == max(len(removed), len(added)) == 1 and removed == ["from crd.criterion import CRDLoss"]
    ns = {"opt": _crd_opt()}
    exec("\n".join(added + ["criterion_kd = CRDLoss(opt)"]), ns)  # noqa: S102 (our own docs)
    assert isinstance(ns["criterion_kd"], gdrd_fast.CRDLoss)


def test_repdistiller_page_saves_and_restores_the_criterion_with_the_student(tmp_path):
    """Saved as the page says after two steps, restored into a fresh student and criterion as it says:
    the next step is the same, banks, log Z and embeddings included."""
    import gdrd_fast

    opt = _crd_opt()
    torch.manual_seed(0)
    model_s, criterion_kd = torch.nn.Linear(3, 3), gdrd_fast.CRDLoss(opt, bank_dtype=torch.float64).double()
    for _ in range(2):
        criterion_kd(*_crd_step(opt))
    save_file = tmp_path / "ckpt.pth"
    exec(_commented_block("repdistiller.md", "# saving"),  # noqa: S102 (our own docs)
         {"torch": torch, "epoch": 3, "model_s": model_s, "criterion_kd": criterion_kd, "save_file": save_file})
    fresh_s, fresh_kd = torch.nn.Linear(3, 3), gdrd_fast.CRDLoss(opt, bank_dtype=torch.float64).double()
    exec(_commented_block("repdistiller.md", "# resuming"),  # noqa: S102 (our own docs)
         {"torch": torch, "model_s": fresh_s, "criterion_kd": fresh_kd, "save_file": save_file})
    assert torch.equal(fresh_s.weight, model_s.weight)
    step = _crd_step(opt)
    want, got = criterion_kd(*step), fresh_kd(*step)
    assert float(got.detach()) == float(want.detach())
    assert torch.equal(fresh_kd.memory_s.rows, criterion_kd.memory_s.rows)


def types_namespace(**kw):
    import types

    return types.SimpleNamespace(**kw)


# ---------------------------------------------------------------------------------------------------
# pytorch-metric-learning
# ---------------------------------------------------------------------------------------------------
def test_pytorch_metric_learning_snippet_equals_the_installed_cross_batch_memory():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    embedding_size, memory_size, batch = 10, 25, 8
    ns = run_snippet("pytorch-metric-learning.md", embedding_size=embedding_size, memory_size=memory_size,
                     embeddings=torch.randn(batch, embedding_size, dtype=torch.float64),
                     labels=torch.randint(3, (batch,)))
    ours = ns["loss_fn"]
    theirs = pml.CrossBatchMemory(pml.NTXentLoss(temperature=0.07), embedding_size=embedding_size,
                                  memory_size=memory_size)
    theirs(ns["embeddings"], ns["labels"])  # the snippet's own call went into ours: one step each
    for _ in range(6):  # wraps around the memory
        emb = torch.randn(batch, embedding_size, dtype=torch.float64, requires_grad=True)
        labels = torch.arange(batch) % 5  # labels that restart every batch: old rows become positives
        want, got = theirs(emb, labels), ours(emb, labels)
        (g_want,) = torch.autograd.grad(want, emb)
        (g_got,) = torch.autograd.grad(got, emb)
        assert abs(float(got.detach()) - float(want.detach())) < 1e-6
        assert float((g_got - g_want).abs().max()) < 1e-6


@pytest.mark.cuda
def test_moco_snippet_and_repdistiller_state_on_gpu():
    from gdrd_fast import CRDLoss, MemoryQueue

    queue = MemoryQueue(8, 4).cuda()
    keys = F.normalize(torch.randn(11, 4, device="cuda"), dim=1)
    queue.push_(keys[:3])
    assert torch.equal(queue.filled(), keys[:3])
    queue.push_(keys[3:])  # wraps: the oldest surviving row is keys[3]
    assert torch.equal(queue.filled(skip_newest=2), keys[3:9])
    opt = _crd_opt()
    theirs = _theirs_after_two_steps(opt, torch.float64)
    ours = CRDLoss(opt, bank_dtype=torch.float64).double()
    ours.load_state_dict(theirs.state_dict())
    ours.cuda()
    f_s, f_t, idx, contrast_idx = _crd_step(opt)
    want = copy.deepcopy(theirs)(f_s, f_t, idx, contrast_idx)
    got = ours(f_s.cuda(), f_t.cuda(), idx.cuda(), contrast_idx.cuda())
    assert abs(float(got.detach()) - float(want.detach())) < 1e-10 * abs(float(want.detach()))
