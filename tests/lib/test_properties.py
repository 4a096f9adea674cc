"""Property-based tests: every functional op, on every CPU backend, against the float64 reference
(gdrd_fast.reference) over shapes, temperatures, options and values that hypothesis draws.

The draws are derandomized (a fixed seed: the same examples on every run) and few per op, so the file
runs in a couple of minutes; GDRD_PROPERTY_EXAMPLES raises the count for a longer fuzzing run. Values
come from a torch generator seeded by the drawn seed, shapes and options straight from hypothesis.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from gdrd_fast import backends, functional as fn, reference as ref  # noqa: E402
from gdrd_fast.params import RelationalParams, relational_param_shapes  # noqa: E402

EXAMPLES = int(os.environ.get("GDRD_PROPERTY_EXAMPLES", "400"))
PROPERTY = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
CPU_BACKENDS = ("torch", "cpu")
seeds = st.integers(0, 2 ** 31 - 1)
temperatures = st.floats(0.05, 1.0)


def backends_of(op: str) -> list[str]:
    return [b for b in CPU_BACKENDS if b in backends.op(op).backends]


def rand(g, *shape, unit=False):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=-1) if unit else x


def close(got, want, what):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert torch.allclose(got, want, rtol=2e-4, atol=2e-4 * (1 + want.abs().max().item())), \
        f"{what}: {got.flatten()[:6].tolist()} vs float64 {want.flatten()[:6].tolist()}"


def loss_and_grad(f, leaf: torch.Tensor, dtype=torch.float32):
    """(loss, d loss / d leaf) of f applied to a fresh copy of leaf in dtype."""
    x = leaf.detach().to(dtype).requires_grad_()
    loss = f(x)
    if not loss.requires_grad:  # no term depends on leaf (InfoNCE with labels but no pairs): the gradient is 0
        return loss, torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


@PROPERTY
@given(seed=seeds, b=st.integers(1, 6), k=st.integers(1, 7), d=st.integers(1, 12), n=st.integers(2, 20),
       t=temperatures, reduction=st.sampled_from(["mean", "sum", "none"]))
def test_crd_nce_loss_and_log_z(seed, b, k, d, n, t, reduction):
    g = torch.Generator().manual_seed(seed)
    anchor, memory = rand(g, b, d, unit=True), rand(g, n, d, unit=True)
    idx = torch.randint(0, n, (b, k + 1), generator=g)
    log_z = float(ref.crd_log_z(anchor, memory, idx, temperature=t))
    close(fn.crd_log_z(anchor.float(), memory.float(), idx, temperature=t), log_z, "crd_log_z")
    want, want_grad = loss_and_grad(lambda a: ref.crd_nce_loss(a, memory, idx, temperature=t, log_z=log_z,
                                                               reduction=reduction), anchor, torch.float64)
    for backend in backends_of("crd_nce_loss"):
        got, grad = loss_and_grad(lambda a, backend=backend: fn.crd_nce_loss(a, memory.float(), idx, temperature=t, log_z=log_z,
                                                            reduction=reduction, backend=backend), anchor)
        close(got, want, f"crd_nce_loss[{backend}]")
        close(grad, want_grad, f"crd_nce_loss[{backend}] grad")
    for backend in backends_of("crd_nce_pair_loss"):
        other = rand(g, b, d, unit=True)
        got = fn.crd_nce_pair_loss(anchor.float(), memory.float(), log_z, other.float(), memory.float(), log_z, idx,
                                   temperature=t, reduction=reduction, backend=backend)
        close(got, want + ref.crd_nce_loss(other, memory, idx, temperature=t, log_z=log_z, reduction=reduction),
              f"crd_nce_pair_loss[{backend}]")


@PROPERTY
@given(seed=seeds, b=st.integers(1, 6), k=st.integers(0, 9), d=st.integers(1, 12), t=temperatures,
       normalize=st.booleans(), in_batch=st.booleans(), labelled=st.booleans(), with_positive=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_infonce_bank_loss(seed, b, k, d, t, normalize, in_batch, labelled, with_positive, reduction):
    g = torch.Generator().manual_seed(seed)
    query, positive, bank = rand(g, b, d), rand(g, b, d), rand(g, k, d)
    if not (normalize or in_batch or labelled):  # the plain bank: values of a unit-norm scale
        query, positive, bank = (F.normalize(x, dim=1) for x in (query, positive, bank))
    options = dict(batch_negatives=rand(g, b, d) if in_batch else None, normalize=normalize)
    if labelled:
        options.update(labels=torch.randint(0, 3, (b,), generator=g), bank_labels=torch.randint(0, 3, (k,), generator=g))
    if not (with_positive or labelled):
        with_positive = True  # a positive is required without labels
    pos = positive if with_positive else None
    want = ref.infonce_bank_pairs_loss(query, pos, bank, temperature=t, reduction=reduction, **options)
    f32 = {key: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for key, v in options.items()}
    for backend in backends_of("infonce_bank_loss"):
        got, grad = loss_and_grad(lambda q, backend=backend: fn.infonce_bank_loss(
            q, None if pos is None else pos.float(), bank.float(), temperature=t, reduction=reduction,
            backend=backend, **f32), query)
        close(got, want, f"infonce_bank_loss[{backend}]")
        _, want_grad = loss_and_grad(lambda q: ref.infonce_bank_pairs_loss(
            q, pos, bank, temperature=t, reduction=reduction, **options), query, torch.float64)
        close(grad, want_grad, f"infonce_bank_loss[{backend}] grad")


def relational_inputs(g, b, q, k, e, d):
    params = RelationalParams(**{name: rand(g, *shape) / math.sqrt(shape[-1])
                                 for name, shape in relational_param_shapes(e, d).items()})
    e_t, e_s = rand(g, b, e, unit=True), rand(g, b, e, unit=True)
    queue_t, queue_s = rand(g, q, e, unit=True), rand(g, q, e, unit=True)
    return e_t, e_s, queue_t, queue_s, torch.randint(0, q, (b, k), generator=g), params


@PROPERTY
@given(seed=seeds, b=st.integers(2, 5), q=st.integers(1, 8), k=st.integers(1, 5), e=st.integers(1, 8),
       d=st.integers(1, 6), t=temperatures, reduction=st.sampled_from(["mean", "sum", "none"]))
def test_relational_contrastive_loss_and_log_z(seed, b, q, k, e, d, t, reduction):
    g = torch.Generator().manual_seed(seed)
    e_t, e_s, queue_t, queue_s, neg_idx, params = relational_inputs(g, b, q, k, e, d)
    n_data = 50
    log_z_t, log_z_s = ref.relational_log_z(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature=t, n_data=n_data)
    params32 = RelationalParams(*(p.float() for p in params))
    close(torch.stack(fn.relational_log_z(e_t.float(), e_s.float(), queue_t.float(), queue_s.float(), neg_idx,
                                          params32, temperature=t, n_data=n_data)),
          torch.stack([log_z_t, log_z_s]), "relational_log_z")
    want, want_grad = loss_and_grad(lambda x: ref.relational_contrastive_loss(
        e_t, x, queue_t, queue_s, neg_idx, params, temperature=t, log_z_t=float(log_z_t), log_z_s=float(log_z_s),
        n_data=n_data, reduction=reduction), e_s, torch.float64)
    for backend in backends_of("relational_contrastive_loss"):
        got, grad = loss_and_grad(lambda x, backend=backend: fn.relational_contrastive_loss(
            e_t.float(), x, queue_t.float(), queue_s.float(), neg_idx, params32, temperature=t,
            log_z_t=float(log_z_t), log_z_s=float(log_z_s), n_data=n_data, reduction=reduction, backend=backend), e_s)
        close(got, want, f"relational_contrastive_loss[{backend}]")
        close(grad, want_grad, f"relational_contrastive_loss[{backend}] grad")


@PROPERTY
@given(seed=seeds, b=st.integers(1, 4), cs=st.integers(1, 8), ct=st.integers(1, 8),
       spatial=st.sampled_from([(), (1, 1), (3, 2), (4, 4)]), bias=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_feature_regression_loss(seed, b, cs, ct, spatial, bias, reduction):
    g = torch.Generator().manual_seed(seed)
    student, teacher = rand(g, b, cs, *spatial), rand(g, b, ct, *spatial)
    weight, b_ = rand(g, ct, cs), rand(g, ct) if bias else None
    want, want_grad = loss_and_grad(lambda s: ref.feature_regression_loss(s, teacher, weight, b_, reduction=reduction),
                                    student, torch.float64)
    for backend in backends_of("feature_regression_loss"):
        got, grad = loss_and_grad(lambda s, backend=backend: fn.feature_regression_loss(
            s, teacher.float(), weight.float(), None if b_ is None else b_.float(), reduction=reduction,
            backend=backend), student)
        close(got, want, f"feature_regression_loss[{backend}]")
        close(grad, want_grad, f"feature_regression_loss[{backend}] grad")


@PROPERTY
@given(seed=seeds, n=st.integers(1, 12), b=st.integers(1, 10), d=st.integers(1, 8), m=st.floats(0.0, 1.0, exclude_max=True))
def test_bank_updates(seed, n, b, d, m):
    g = torch.Generator().manual_seed(seed)
    memory_a, memory_b = rand(g, n, d, unit=True), rand(g, n, d, unit=True)
    values_a, values_b = rand(g, b, d), rand(g, b, d)
    idx = torch.randint(0, n, (b,), generator=g)  # duplicates included: the last one wins
    want_a = ref.bank_update_(memory_a.clone(), idx, values_a, m)
    want_b = ref.bank_update_(memory_b.clone(), idx, values_b, m)
    for backend in backends_of("bank_update_"):
        got = memory_a.float()
        fn.bank_update_(got, idx, values_a.float(), m, backend=backend)
        close(got, want_a, f"bank_update_[{backend}]")
    for backend in backends_of("bank_update_pair_"):
        got_a, got_b = memory_a.float(), memory_b.float()
        fn.bank_update_pair_(got_a, values_a.float(), got_b, values_b.float(), idx, m, backend=backend)
        close(torch.cat([got_a, got_b]), torch.cat([want_a, want_b]), f"bank_update_pair_[{backend}]")


@PROPERTY
@given(seed=seeds, size=st.integers(1, 9), n=st.integers(1, 20), d=st.integers(1, 5), ptr=st.integers(0, 8),
       labelled=st.booleans())
def test_queue_push(seed, size, n, d, ptr, labelled):
    g = torch.Generator().manual_seed(seed)
    queue, values = rand(g, size, d), rand(g, n, d)
    labels = torch.randint(0, 5, (n,), generator=g) if labelled else None
    queue_labels = torch.randint(0, 5, (size,), generator=g) if labelled else None
    start = torch.tensor(ptr % size)
    want = [queue.clone(), start.clone(), torch.tensor(0), None if queue_labels is None else queue_labels.clone()]
    ref.queue_push_(want[0], want[1], want[2], values, labels, want[3])
    for backend in backends_of("queue_push_"):
        got = [queue.float(), start.clone(), torch.tensor(0), None if queue_labels is None else queue_labels.clone()]
        fn.queue_push_(got[0], got[1], got[2], values.float(), labels, got[3], backend=backend)
        close(got[0], want[0], f"queue_push_[{backend}]")
        assert int(got[1]) == int(want[1]) and int(got[2]) == int(want[2])
        assert got[3] is None or torch.equal(got[3], want[3])


@PROPERTY
@given(seed=seeds, size=st.integers(1, 12), b=st.integers(1, 6), k=st.integers(1, 8), labelled=st.booleans())
def test_queue_sample_negatives(seed, size, b, k, labelled):
    g = torch.Generator().manual_seed(seed)
    filled = int(torch.randint(1, size + 1, (), generator=g))
    queue_labels = torch.randint(0, 3, (size,), generator=g) if labelled else None
    partner = torch.randint(0, 3, (b,), generator=g)
    draw_seed = torch.tensor([seed], dtype=torch.int64)
    want = ref.queue_sample_negatives(queue_labels, filled, partner, draw_seed, k)
    for backend in backends_of("queue_sample_negatives"):
        got = fn.queue_sample_negatives(queue_labels, filled, partner, draw_seed, k, backend=backend)
        assert torch.equal(got, want), f"queue_sample_negatives[{backend}]"
    picked = want[want >= 0]
    assert (picked < filled).all()
    if labelled:  # a drawn row is never of the partner's class
        rows = torch.arange(b)[:, None].expand(b, k)[want >= 0]
        assert (queue_labels[picked] != partner[rows]).all()
