"""Two gloo processes on CPU against one process fed the concatenated batch (issue 6).

One spawn of 2 ranks (gloo over a file store) runs every case: each trains for a few SGD steps under
DistributedDataParallel with uneven local batches, saves what it saw, and the parent compares it
with a single-process run in float64: per-step losses, weights, banks and queues.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gdrd_fast import CRDLoss, MemoryBank, RelationalContrastiveLoss
from gdrd_fast.distributed import (DistributedCRDLoss, DistributedRelationalContrastiveLoss, ShardedMemoryBank,
                                   gather_rows, gather_rows_with_grad)
from gloo_ranks import run_ranks

pytestmark = pytest.mark.distributed
SIZES = [3, 4]  # uneven local batches: rank 0 holds global rows 0..2, rank 1 rows 3..6
TOL = dict(rtol=1e-9, atol=1e-11)  # float64 end to end; only the order of sums differs


def _run_cases(rank, cases):
    return {name: worker(rank, *args) for name, (worker, args) in cases.items()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every multi-process case runs in ONE spawn of 2 ranks (starting processes dominates the cost).

    Returns {case: (inputs, [rank 0 result, rank 1 result])}; the tests compare with one process.
    """
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    inputs = {"crd": (_crd_batches(), *_crd_models()),
              "relational": (_relational_batches(), torch.nn.Linear(S_IN, E_DIM).double(), _relational_loss()),
              "bank": _sharded_bank_inputs()}
    cases = {}
    for sharded in (False, True):
        batches, student, loss_fn = inputs["crd"]
        cases[f"crd_sharded={sharded}"] = (_crd_worker, (sharded, _state(student), _state(loss_fn), batches))
    batches, student, loss_fn = inputs["relational"]
    cases["relational"] = (_relational_worker, (_state(student), _state(loss_fn), batches))
    cases["bank"] = (_sharded_bank_worker, inputs["bank"])
    ranks = run_ranks(_run_cases, (cases,), 2, tmp_path_factory.mktemp("ranks"))
    return {name: [r[name] for r in ranks] for name in cases}, inputs


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _local(t, rank, sizes=SIZES):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


# ---------------------------------------------------------------------------------------------------
# CRD: bank rows carry no gradient; each rank scores its own rows, banks get the gathered update.
# ---------------------------------------------------------------------------------------------------
N, FEAT, S_IN, S_DIM, T_DIM, K, STEPS, LR = 13, 5, 7, 6, 4, 9, 3, 0.5


def _crd_batches():
    g = sum(SIZES)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(g, S_IN, dtype=torch.float64)
        f_t = torch.randn(g, T_DIM, dtype=torch.float64)
        idx = torch.randint(N, (g,))
        idx[5] = idx[1]  # the same id on both ranks: rank 1's value must win, as in one process
        idx[6] = idx[3]
        contrast = torch.cat([idx[:, None], torch.randint(N, (g, K))], 1)
        batches.append((x, f_t, idx, contrast))
    return batches


def _crd_models():
    student = torch.nn.Linear(S_IN, S_DIM).double()
    loss = CRDLoss(S_DIM, T_DIM, N, feat_dim=FEAT, nce_k=K, bank_dtype=torch.float64).double()
    return student, loss


def _train_crd(student, loss_fn, batches, rank=None):
    opt = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=LR, momentum=0.9)
    losses = []
    for x, f_t, idx, contrast in batches:
        if rank is not None:
            x, f_t, idx, contrast = (_local(t, rank) for t in (x, f_t, idx, contrast))
        loss = loss_fn(student(x), f_t, idx, contrast)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _crd_worker(rank, sharded, student_state, loss_state, batches):
    torch.manual_seed(1000 + rank)  # different RNG per rank: agreement must not rely on seeds
    student = torch.nn.Linear(S_IN, S_DIM).double()
    student.load_state_dict(student_state)
    loss_fn = DistributedCRDLoss(S_DIM, T_DIM, N, feat_dim=FEAT, nce_k=K, bank_dtype=torch.float64,
                                 sharded=sharded).double()
    if sharded:
        shard = slice(loss_fn.memory_s.start, loss_fn.memory_s.stop)
        loss_state = {k: v[shard] if k.startswith("memory_") else v for k, v in loss_state.items()}
    loss_fn.load_state_dict(loss_state)
    losses = _train_crd(DDP(student), DDP(loss_fn), batches, rank)

    # a replicated bank built from a rank-dependent seed is broadcast from rank 0 on first use
    fresh = DistributedCRDLoss(S_DIM, T_DIM, N, feat_dim=FEAT, nce_k=K).double()
    x, f_t, idx, contrast = (_local(t, rank) for t in batches[0])
    fresh(torch.randn(x.shape[0], S_DIM, dtype=torch.float64), f_t, idx, contrast)
    return dict(losses=losses, student=student.state_dict(), loss=loss_fn.state_dict(),
                fresh_bank=fresh.memory_t.rows.clone())


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_crd_two_ranks_equal_one_process_on_global_batch(two_ranks, sharded):
    results, inputs = two_ranks
    ranks = results[f"crd_sharded={sharded}"]
    batches, student, loss_fn = copy.deepcopy(inputs["crd"])
    init_student, init_loss = _state(student), _state(loss_fn)
    single_losses = _train_crd(student, loss_fn, batches)

    # DDP averages the per-rank losses' gradients, so the global loss is their mean
    torch.testing.assert_close(sum(r["losses"] for r in ranks) / len(ranks), single_losses, **TOL)
    for name, value in student.state_dict().items():
        assert not torch.equal(value, init_student[name]), "training must move the weights"
        assert torch.equal(ranks[0]["student"][name], ranks[1]["student"][name])
        torch.testing.assert_close(ranks[0]["student"][name], value, **TOL)
    for name, value in loss_fn.state_dict().items():
        if sharded and name.startswith("memory_"):
            torch.testing.assert_close(torch.cat([r["loss"][name] for r in ranks]), value, **TOL)
            continue
        if name.startswith("memory_"):  # the banks stay bit-identical across ranks
            assert not torch.equal(value, init_loss[name])
        assert torch.equal(ranks[0]["loss"][name], ranks[1]["loss"][name]), name
        torch.testing.assert_close(ranks[0]["loss"][name], value, **TOL)
    assert torch.equal(ranks[0]["fresh_bank"], ranks[1]["fresh_bank"])


# ---------------------------------------------------------------------------------------------------
# CRRCD: every rank computes the global loss; e_s is gathered with gradient.
# ---------------------------------------------------------------------------------------------------
E_DIM, REL, NEG, QUEUE, CLASSES, R_STEPS, SEED = 6, 5, 3, 8, 4, 4, 1234
R_SIZES = [2, 3]  # the queue (8 rows) fills after 2 steps: steps 3 and 4 are active and freeze Z


def _relational_batches():
    g = sum(R_SIZES)
    return [(torch.randn(g, S_IN, dtype=torch.float64),
             F.normalize(torch.randn(g, E_DIM, dtype=torch.float64), dim=1),
             (torch.arange(g) + step * g) % CLASSES) for step in range(R_STEPS)]


def _relational_loss(cls=RelationalContrastiveLoss):
    return cls(E_DIM, REL, NEG, QUEUE, n_data=20).double()


def _train_relational(student, loss_fn, batches, rank=None):
    opt = torch.optim.SGD([*student.parameters(), *loss_fn.parameters()], lr=LR, momentum=0.9)
    losses = []
    for x, e_t, labels in batches:
        if rank is not None:
            x, e_t, labels = (_local(t, rank, R_SIZES) for t in (x, e_t, labels))
        loss = loss_fn(e_t, F.normalize(student(x), dim=1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _relational_worker(rank, student_state, loss_state, batches):
    torch.manual_seed(2000 + rank)
    student = torch.nn.Linear(S_IN, E_DIM).double()
    student.load_state_dict(student_state)
    loss_fn = _relational_loss(DistributedRelationalContrastiveLoss)
    loss_fn.load_state_dict(loss_state)
    loss_fn.generator = torch.Generator().manual_seed(SEED)  # the same seed on every rank
    losses = _train_relational(DDP(student), DDP(loss_fn), batches, rank)
    student_state, loss_state = _state(student), _state(loss_fn)
    loss_fn.generator = None  # now a generator seeded from rank 0: every rank must draw the same
    shared_loss = _train_relational(student, loss_fn, batches[-1:], rank)
    return dict(losses=losses, student=student_state, loss=loss_state, shared_loss=shared_loss)


def test_relational_two_ranks_equal_one_process_on_global_batch(two_ranks):
    results, inputs = two_ranks
    ranks = results["relational"]
    batches, student, loss_fn = copy.deepcopy(inputs["relational"])
    init_student = _state(student)
    loss_fn.generator = torch.Generator().manual_seed(SEED)
    single_losses = _train_relational(student, loss_fn, batches)

    assert bool((single_losses[2:] > 0).all()), "the loss must be active once the queue is full"
    for r in ranks:  # each rank computes the whole global loss
        torch.testing.assert_close(r["losses"], single_losses, **TOL)
    assert torch.equal(ranks[0]["shared_loss"], ranks[1]["shared_loss"])
    for name, value in student.state_dict().items():
        assert not torch.equal(value, init_student[name])
        assert torch.equal(ranks[0]["student"][name], ranks[1]["student"][name])
        torch.testing.assert_close(ranks[0]["student"][name], value, **TOL)
    for name, value in loss_fn.state_dict().items():
        assert torch.equal(ranks[0]["loss"][name], ranks[1]["loss"][name]), name
        torch.testing.assert_close(ranks[0]["loss"][name], value, **TOL)
    assert torch.equal(ranks[0]["loss"]["queue_t.values"], loss_fn.state_dict()["queue_t.values"])


# ---------------------------------------------------------------------------------------------------
# ShardedMemoryBank on its own, and the gathers' gradient rule.
# ---------------------------------------------------------------------------------------------------
def _sharded_bank_worker(rank, full, updates, requests):
    torch.manual_seed(3000 + rank)
    bank = ShardedMemoryBank(full.shape[0], full.shape[1], momentum=0.3, dtype=torch.float64)
    bank.rows.copy_(full[bank.start:bank.stop])
    for idx, values in updates:
        bank.update_(idx, values)
    with pytest.raises(ValueError, match="idx"):
        bank.update_(torch.tensor([0, full.shape[0]]), updates[0][1][:2])
    fetched = bank.fetch(requests[rank])

    x = torch.randn(SIZES[rank], 3, dtype=torch.float64, requires_grad=True)
    every = gather_rows_with_grad(x, SIZES)
    weights = torch.arange(1.0, 1 + every.numel(), dtype=torch.float64).reshape(every.shape)
    ((rank + 1) * (every * weights).sum()).backward()
    return dict(shard=bank.rows, fetched=fetched, x=x.detach(), x_grad=x.grad,
                every_x=gather_rows(x, SIZES))


def _sharded_bank_inputs():
    n, dim = 11, 4  # ceil(11/2) = 6: rank 0 owns rows 0..5, rank 1 rows 6..10
    initial = MemoryBank(n, dim, dtype=torch.float64).rows
    updates = []
    for _ in range(3):
        idx = torch.randint(n, (7,))
        idx[4], idx[6] = idx[0], 5  # duplicates within a batch, and an id on the shard border
        updates.append((idx, torch.randn(7, dim, dtype=torch.float64)))
    requests = [torch.randint(n, (9,)), torch.tensor([10, 0, 6, 5, 10])]
    return initial, updates, requests


def test_sharded_bank_and_gathers(two_ranks):
    results, inputs = two_ranks
    ranks = results["bank"]
    initial, updates, requests = inputs["bank"]
    full = MemoryBank(initial.shape[0], initial.shape[1], momentum=0.3, dtype=torch.float64)
    full.rows.copy_(initial)
    for idx, values in updates:
        full.update_(idx, values)

    assert torch.equal(torch.cat([r["shard"] for r in ranks]), full.rows)
    for r, req in zip(ranks, requests):
        assert torch.equal(r["fetched"], full.rows[req])
    every_x = torch.cat([r["x"] for r in ranks])
    weights = torch.arange(1.0, 1 + every_x.numel(), dtype=torch.float64).reshape(every_x.shape)
    for r in ranks:
        assert torch.equal(r["every_x"], every_x)
    # rank r's loss is (r + 1) * sum(w * x): the gradient each rank gets is the sum over ranks, 3 * w
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), 3 * weights)


# ---------------------------------------------------------------------------------------------------
# One process, no process group: the distributed forms are the plain ones.
# ---------------------------------------------------------------------------------------------------
def test_without_process_group_the_distributed_losses_are_the_plain_ones():
    (x, f_t, idx, contrast), = _crd_batches()[:1]
    student, plain = _crd_models()
    dist_loss = DistributedCRDLoss(S_DIM, T_DIM, N, feat_dim=FEAT, nce_k=K, bank_dtype=torch.float64).double()
    dist_loss.load_state_dict(plain.state_dict())
    f_s = student(x)
    a, b = plain(f_s, f_t, idx, contrast), dist_loss(f_s, f_t, idx, contrast)
    torch.testing.assert_close(a, b, **TOL)
    grads_a = torch.autograd.grad(a * 0.7, [f_s, *plain.parameters()])
    grads_b = torch.autograd.grad(b * 0.7, [f_s, *dist_loss.parameters()])
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **TOL)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(dist_loss.state_dict()[name], value, **TOL)
    t = torch.randn(4, 3)
    assert gather_rows(t, [4]) is t and gather_rows_with_grad(t, [4]) is t


def test_sharded_bank_rejects_bad_input_without_writing():
    bank = ShardedMemoryBank(5, 3)
    before = bank.rows.clone()
    with pytest.raises(ValueError, match="idx"):
        bank.update_(torch.tensor([1, 5]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="feature dim"):
        bank.update_(torch.tensor([1, 2]), torch.randn(2, 4))
    with pytest.raises(TypeError, match="idx"):
        bank.fetch(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="momentum"):
        ShardedMemoryBank(5, 3, momentum=1.0)
    assert torch.equal(bank.rows, before)
