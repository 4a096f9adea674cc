"""infonce_bank_loss with in-batch negatives, labels and normalize: reference, fast paths, and the peer
it reproduces (pytorch-metric-learning's CrossBatchMemory(NTXentLoss), run from the installed package)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import gdrd_fast
from gdrd_fast import reference
from infonce_cases import check_infonce_pairs


def _case(b, k, d, n_labels, dtype=torch.float64, with_positive=True):
    g = torch.default_generator  # seeded afresh for every test (conftest)
    q = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    p = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_() if with_positive else None
    n = torch.randn(b, d, generator=g, dtype=dtype).requires_grad_()
    bank = torch.randn(k, d, generator=g, dtype=dtype)
    labels = torch.randint(n_labels, (b,), generator=g)
    bank_labels = torch.randint(n_labels, (k,), generator=g)
    return q, p, n, bank, labels, bank_labels


def _naive(q, p, bank, n, labels, bank_labels, t, normalize):
    """Loops over queries and candidates: the second formulation of the pair loss (mean over pairs)."""
    if normalize:
        q, bank = F.normalize(q, dim=1), F.normalize(bank, dim=1)
        p = None if p is None else F.normalize(p, dim=1)
        n = None if n is None else F.normalize(n, dim=1)
    total, pairs = 0.0, 0
    for b in range(q.shape[0]):
        cands = [(bank[j], None if labels is None else bool(labels[b] == bank_labels[j])) for j in range(len(bank))]
        if n is not None:
            cands += [(n[j], None if labels is None else bool(labels[b] == labels[j]))
                      for j in range(q.shape[0]) if j != b]
        negs = [float(q[b] @ key) / t for key, same in cands if not same]
        poss = [float(q[b] @ key) / t for key, same in cands if same]
        if p is not None:
            poss.append(float(q[b] @ p[b]) / t)
        for s in poss:
            total += -math.log(math.exp(s) / (math.exp(s) + sum(math.exp(x) for x in negs)))
            pairs += 1
    return total / max(pairs, 1)


@pytest.mark.parametrize("labelled,with_batch,normalize", [(False, True, False), (True, True, True), (True, False, False)])
def test_reference_equals_naive_loops(labelled, with_batch, normalize):
    q, p, n, bank, labels, bank_labels = _case(5, 7, 4, 3)
    kw = {"batch_negatives": n if with_batch else None, "labels": labels if labelled else None,
              "bank_labels": bank_labels if labelled else None, "normalize": normalize}
    ours = reference.infonce_bank_pairs_loss(q, p, bank, temperature=0.3, **kw)
    naive = _naive(q.detach(), p.detach(), bank, n.detach() if with_batch else None, kw["labels"], kw["bank_labels"],
                   0.3, normalize)
    assert abs(float(ours.detach()) - naive) < 1e-12


def test_reference_gradcheck():
    q, p, n, bank, labels, bank_labels = _case(4, 5, 3, 2)
    for lab, bank_lab in ((None, None), (labels, bank_labels)):
        def f(q, p, n, lab=lab, bank_lab=bank_lab):
            return reference.infonce_bank_pairs_loss(q, p, bank, temperature=0.5, batch_negatives=n, labels=lab,
                                                     bank_labels=bank_lab, normalize=True)
        assert torch.autograd.gradcheck(f, (q, p, n))


def test_without_options_it_is_the_plain_loss():
    q, p, _, bank, _, _ = _case(6, 9, 5, 2)
    plain = reference.infonce_bank_loss(q, p, bank, temperature=0.2, reduction="none")
    assert torch.allclose(reference.infonce_bank_pairs_loss(q, p, bank, temperature=0.2, reduction="none"), plain,
                          atol=1e-13)


SIZES = [(1, 0, 31), (1, 123, 31), (47, 1, 100), (47, 123, 31), (6, 0, 128)]
OPTIONS = [{"batch_negatives": True}, {"normalize": True}, {"batch_negatives": True, "normalize": True},
           {"labels": True}, {"labels": True, "batch_negatives": True, "normalize": True},
           {"labels": True, "batch_negatives": True, "positive": False}]


@pytest.mark.parametrize("size,opts", list(itertools.product(SIZES, OPTIONS)))
def test_fast_path_matches_reference_float64(size, opts):
    b, k, d = size
    with_positive = opts.get("positive", True)
    q, p, n, bank, labels, bank_labels = _case(b, k, d, 3, with_positive=with_positive)
    kw = {"temperature": 0.13, "batch_negatives": n if opts.get("batch_negatives") else None,
              "normalize": opts.get("normalize", False), "labels": labels if opts.get("labels") else None,
              "bank_labels": bank_labels if opts.get("labels") else None}
    inputs = [t for t in (q, p, kw["batch_negatives"]) if t is not None]
    for reduction in ("mean", "sum", "none"):
        got, want = (gdrd_fast.infonce_bank_loss(q, p, bank, reduction=reduction, backend=be, **kw)
                     for be in ("cpu", "torch"))
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        grad_out = torch.rand_like(got) + 0.5
        g_got = torch.autograd.grad(got, inputs, grad_out, allow_unused=True)
        g_want = torch.autograd.grad(want, inputs, grad_out, allow_unused=True)
        for a, w in zip(g_got, g_want):
            torch.testing.assert_close(a if a is not None else torch.zeros_like(w), w, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(gdrd_fast.infonce_bank_loss(q, p, bank, backend="cpu", **kw),
                                   gdrd_fast.infonce_bank_loss(q, p, bank, backend="torch", **kw))


def test_fast_path_float32_within_tolerance_and_never_nan():
    q, p, n, bank, labels, bank_labels = _case(33, 257, 64, 4, dtype=torch.float32)
    kw = {"temperature": 0.07, "batch_negatives": n, "normalize": True, "labels": labels, "bank_labels": bank_labels}
    got = gdrd_fast.infonce_bank_loss(q, p, bank, backend="cpu", **kw)
    want = gdrd_fast.infonce_bank_loss(*(t.double() for t in (q, p, bank)), backend="torch",
                                       **{**kw, "batch_negatives": n.double()})
    assert got.dtype == torch.float32 and abs(float(got) - float(want)) < 5e-4 * max(1.0, float(want))
    got.backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, p, n))
    # a query whose class fills bank and batch has no negatives at all: zero loss, zero (not NaN) gradient
    same = torch.zeros(3, dtype=torch.long)
    q2 = torch.randn(3, 8, requires_grad=True)
    loss = gdrd_fast.infonce_bank_loss(q2, None, torch.randn(4, 8), batch_negatives=q2.detach(), labels=same,
                                       bank_labels=torch.zeros(4, dtype=torch.long), backend="cpu")
    loss.backward()
    assert float(loss) == 0.0 and bool((q2.grad == 0).all())


def test_clear_errors():
    q, p, n, bank, labels, bank_labels = _case(4, 5, 3, 2)
    with pytest.raises(ValueError, match="positive is required"):
        gdrd_fast.infonce_bank_loss(q, None, bank)
    with pytest.raises(ValueError, match="bank_labels is required"):
        gdrd_fast.infonce_bank_loss(q, p, bank, labels=labels)
    with pytest.raises(ValueError, match="bank_labels needs labels"):
        gdrd_fast.infonce_bank_loss(q, p, bank, bank_labels=bank_labels)
    with pytest.raises(ValueError, match="batch_negatives must match"):
        gdrd_fast.infonce_bank_loss(q, p, bank, batch_negatives=n[:3])
    with pytest.raises(ValueError, match="bank rows"):
        gdrd_fast.infonce_bank_loss(q, p, bank, labels=labels, bank_labels=bank_labels[:2])


@pytest.mark.parametrize("memory_size,batch,steps", [(20, 6, 7), (33, 11, 5)])
def test_equals_pytorch_metric_learning_cross_batch_ntxent(memory_size, batch, steps):
    """CrossBatchMemory enqueues the batch first: the in-batch rows are candidates, same-label queue rows
    are positives, the batch's own slot is skipped. The queue here holds only what survives that push."""
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    dim, temperature = 9, 0.1
    peer = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=temperature), embedding_size=dim,
                                       memory_size=memory_size)
    queue = gdrd_fast.MemoryQueue(memory_size, dim, with_labels=True, dtype=torch.float64)
    g = torch.default_generator
    for _ in range(steps):  # wraps around the ring
        emb = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(4, (batch,), generator=g)
        want = peer(emb, labels)
        (g_want,) = torch.autograd.grad(want, emb)
        queue.push_(emb.detach(), labels)
        for backend in ("cpu", "torch"):
            got = gdrd_fast.infonce_bank_loss(
                emb, None, queue.filled(skip_newest=batch), batch_negatives=emb.detach(), normalize=True,
                labels=labels, bank_labels=queue.filled_labels(skip_newest=batch), temperature=temperature,
                backend=backend)
            (g_got,) = torch.autograd.grad(got, emb)
            assert abs(float(got) - float(want)) < 1e-6
            assert float((g_got - g_want).abs().max()) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_an_empty_bank_is_moco_from_an_empty_queue(backend):
    """No negatives at all: logsumexp over the positive alone, loss 0, zero gradient (not NaN)."""
    q, p = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    loss = gdrd_fast.infonce_bank_loss(q, p, torch.zeros(0, 8), backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((q.grad == 0).all()) and bool((p.grad == 0).all())


def test_module_form_passes_the_options_through():
    q, p, n, bank, labels, bank_labels = _case(7, 11, 5, 3)
    kw = {"batch_negatives": n, "labels": labels, "bank_labels": bank_labels}
    module = gdrd_fast.InfoNCEBankLoss(temperature=0.2, normalize=True, backend="cpu")
    want = gdrd_fast.infonce_bank_loss(q, p, bank, temperature=0.2, normalize=True, backend="torch", **kw)
    torch.testing.assert_close(module(q, p, bank, **kw), want)


@pytest.mark.cuda
@pytest.mark.parametrize("b,k,d", [(1, 123, 31), (47, 1000, 128), (6, 0, 512)])
@pytest.mark.parametrize("labelled", [False, True])
def test_gpu_paths_match_float64(b, k, d, labelled):
    """On CUDA: the bank through the Triton kernel (unlabelled) or the chunked masked path (labelled)."""
    check_infonce_pairs("auto", b, k, d, labelled, "cuda", temperature=0.07, classes=5)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_normalize_runs_in_the_accumulation_dtype(backend):
    """A lower-precision bank is normalised after its cast to the accumulation dtype, on every backend: an fp32
    query against a bf16 bank equals the same bank cast to fp32 first, and float64 against fp32 is float64-exact."""
    q, p = torch.randn(6, 16), torch.randn(6, 16)
    bank = torch.randn(40, 16).to(torch.bfloat16)
    got = gdrd_fast.infonce_bank_loss(q, p, bank, normalize=True, backend=backend)
    want = gdrd_fast.infonce_bank_loss(q, p, bank.float(), normalize=True, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    q64, p64, bank32 = q.double(), p.double(), torch.randn(40, 16)
    got = gdrd_fast.infonce_bank_loss(q64, p64, bank32, normalize=True, backend=backend)
    want = gdrd_fast.infonce_bank_loss(q64, p64, bank32.double(), normalize=True, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
