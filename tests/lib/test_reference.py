"""The references: gradcheck in float64, and agreement with naive loop formulations on hand-sized cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from gdrd_fast import RelationalParams, numerics
from gdrd_fast import reference as R

f64 = torch.float64


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=f64), dim=-1)


# --- crd_nce_loss --------------------------------------------------------------------------------------
def repdistiller_crd_side(x, memory, idx, T, Z, n_data):
    """RepDistiller's ContrastMemory (out = exp(bmm / T) / Z) then ContrastLoss, spelled as in that code."""
    weight = torch.index_select(memory, 0, idx.view(-1)).view(idx.shape[0], idx.shape[1], -1)
    out = torch.exp(torch.bmm(weight, x.view(x.shape[0], -1, 1)).squeeze(2) / T) / Z
    eps, m, Pn = 1e-7, out.shape[1] - 1, 1.0 / n_data
    P_pos = out.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = out.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / x.shape[0]


def test_crd_matches_repdistiller_formula():
    n, b, k, d = 37, 5, 9, 11
    memory, anchor = _unit(n, d), _unit(b, d)
    idx = torch.randint(n, (b, k + 1))
    log_z = 2.3
    ours = R.crd_nce_loss(anchor, memory, idx, temperature=0.07, log_z=log_z)
    theirs = repdistiller_crd_side(anchor, memory, idx, 0.07, math.exp(log_z), n)
    torch.testing.assert_close(ours, theirs.squeeze(), rtol=1e-12, atol=1e-12)


def test_crd_matches_loops_and_log_z():
    n, b, k, d = 13, 3, 4, 5
    memory, anchor = _unit(n, d), _unit(b, d)
    idx = torch.randint(n, (b, k + 1))
    T, log_z, eps = 0.1, 0.7, 1e-7
    c = k / n
    total, scores = 0.0, []
    for i in range(b):
        for j in range(k + 1):
            s = float(sum(memory[idx[i, j], t] * anchor[i, t] for t in range(d)))
            scores.append(s / T)
            p = math.exp(s / T - log_z)
            total += -math.log(p / (p + c + eps)) if j == 0 else -math.log(c / (p + c + eps))
    rows = R.crd_nce_loss(anchor, memory, idx, temperature=T, log_z=log_z, reduction="none")
    assert rows.sum().item() == pytest.approx(total, rel=1e-12)
    assert R.crd_nce_loss(anchor, memory, idx, temperature=T, log_z=log_z).item() == pytest.approx(total / b, rel=1e-12)
    expected_log_z = math.log(n * sum(math.exp(s) for s in scores) / len(scores))
    assert R.crd_log_z(anchor, memory, idx, temperature=T).item() == pytest.approx(expected_log_z, rel=1e-12)


def test_crd_gradcheck():
    memory, idx = _unit(11, 6), torch.randint(11, (4, 6))
    anchor = _unit(4, 6).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: R.crd_nce_loss(a, memory, idx, temperature=0.2, log_z=1.1, reduction="none"), (anchor,))


# --- infonce_bank_loss ---------------------------------------------------------------------------------
def test_infonce_matches_loops():
    b, k, d, T = 3, 5, 4, 0.2
    q, p, bank = _unit(b, d), _unit(b, d), _unit(k, d)
    for i in range(b):
        logits = [float(q[i] @ p[i]) / T] + [float(q[i] @ bank[j]) / T for j in range(k)]
        expected = -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
        got = R.infonce_bank_loss(q, p, bank, temperature=T, reduction="none")[i].item()
        assert got == pytest.approx(expected, rel=1e-12)


def test_infonce_gradcheck():
    q, p, bank = _unit(3, 5).requires_grad_(), _unit(3, 5).requires_grad_(), _unit(7, 5)
    assert torch.autograd.gradcheck(
        lambda q, p: R.infonce_bank_loss(q, p, bank, temperature=0.3, reduction="none"), (q, p))


# --- relational_contrastive_loss -----------------------------------------------------------------------
def _params(e, d, requires_grad=False):
    shapes = dict(ft_w1=(d, e), ft_b1=(d,), ft_w2=(d, d), ft_b2=(d,), fts_u=(d, e), fts_v=(d, e), fts_b1=(d,),
                  fts_w2=(d, d), fts_b2=(d,), h1_w=(d, d), h1_b=(d,), h2_w=(d, d), h2_b=(d,))
    return RelationalParams(**{k: (torch.randn(*s, dtype=f64) * 0.5).requires_grad_(requires_grad)
                                 for k, s in shapes.items()})


def test_relational_matches_loops():
    b, e, d, q_size, k, T, n_data = 3, 5, 4, 6, 2, 0.1, 50
    p = _params(e, d)
    e_t, e_s = _unit(b, e), _unit(b, e)
    queue_t, queue_s = _unit(q_size, e), _unit(q_size, e)
    neg_idx = torch.randint(q_size, (b, k))
    log_z_t, log_z_s = 1.5, 2.5
    relu = torch.relu

    def f_t(a, c):
        return p.ft_w2 @ relu(p.ft_w1 @ a - p.ft_w1 @ c + p.ft_b1) + p.ft_b2

    def f_ts(a, c):
        return p.fts_w2 @ relu(p.fts_u @ a - p.fts_v @ c + p.fts_b1) + p.fts_b2

    def h1(x):
        y = p.h1_w @ x + p.h1_b
        return y / y.norm()

    def h2(x):
        y = p.h2_w @ x + p.h2_b
        return y / y.norm()

    shift = math.log(k / n_data + 1e-7)
    softplus = lambda x: math.log1p(math.exp(x))
    expected = []
    for i in range(b):
        for j in range(b):
            if i == j:
                continue
            row = 0.0
            for log_z, query, keys in [
                (log_z_s, h2(f_ts(e_t[i], e_s[j])),
                 [h1(f_t(e_t[i], e_t[j]))] + [h1(f_t(e_t[i], queue_t[neg_idx[j, n]])) for n in range(k)]),
                (log_z_t, h1(f_t(e_t[i], e_t[j])),
                 [h2(f_ts(e_t[i], e_s[j]))] + [h2(f_ts(e_t[i], queue_s[neg_idx[j, n]])) for n in range(k)])]:
                ls = [float(query @ key) / T - log_z - shift for key in keys]
                row += softplus(-ls[0]) + sum(softplus(x) for x in ls[1:])
            expected.append(row)
    got = R.relational_contrastive_loss(e_t, e_s, queue_t, queue_s, neg_idx, p, temperature=T, log_z_t=log_z_t,
                                        log_z_s=log_z_s, n_data=n_data, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=f64), rtol=1e-12, atol=1e-12)
    mean = R.relational_contrastive_loss(e_t, e_s, queue_t, queue_s, neg_idx, p, temperature=T, log_z_t=log_z_t,
                                         log_z_s=log_z_s, n_data=n_data)
    assert mean.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_relational_pairs_are_i_major_without_diagonal():
    i, j = numerics.pair_indices(4)
    assert list(zip(i.tolist(), j.tolist()))[:5] == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2)]
    assert len(i) == 12 and bool((i != j).all())


def test_relational_gradients_are_those_of_frozen_keys():
    """Keys are stop-grad: the gradient is the true derivative of the loss with keys held fixed."""
    b, e, d, q_size, k, T, n_data = 3, 4, 3, 5, 2, 0.5, 20
    p = _params(e, d, requires_grad=True)
    e_t, e_s = _unit(b, e).requires_grad_(), _unit(b, e).requires_grad_()
    queue_t, queue_s, neg_idx = _unit(q_size, e), _unit(q_size, e), torch.randint(q_size, (b, k))
    fixed_params, fixed_e_s = RelationalParams(*(t.detach().clone() for t in p)), e_s.detach().clone()

    def frozen_key_rows(e_s, *flat):
        s_s, s_t = R.relational_scores(e_t, e_s, queue_t, queue_s, neg_idx, RelationalParams(*flat),
                                       key_params=fixed_params, key_e_s=fixed_e_s)
        return R.relational_side_rows(s_s, T, 0.2, k, n_data) + R.relational_side_rows(s_t, T, 0.3, k, n_data)

    assert torch.autograd.gradcheck(frozen_key_rows, (e_s, *p))
    weights = torch.randn(b * (b - 1), dtype=f64)
    loss = R.relational_contrastive_loss(e_t, e_s, queue_t, queue_s, neg_idx, p, temperature=T, log_z_t=0.3,
                                         log_z_s=0.2, n_data=n_data, reduction="none")
    grads = torch.autograd.grad((loss * weights).sum(), (e_s, *p), retain_graph=True)
    expected = torch.autograd.grad((frozen_key_rows(e_s, *p) * weights).sum(), (e_s, *p))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (loss * weights).sum().backward()
    assert e_t.grad is None


# --- feature_regression_loss ---------------------------------------------------------------------------
def test_feature_regression_matches_loops_and_gradcheck():
    b, cs, ct, h, w = 2, 3, 4, 2, 3
    x, t = torch.randn(b, cs, h, w, dtype=f64), torch.randn(b, ct, h, w, dtype=f64)
    weight, bias = torch.randn(ct, cs, dtype=f64), torch.randn(ct, dtype=f64)
    total = 0.0
    for n in range(b):
        for o in range(ct):
            for y in range(h):
                for z in range(w):
                    proj = sum(float(weight[o, c] * x[n, c, y, z]) for c in range(cs)) + float(bias[o])
                    total += (proj - float(t[n, o, y, z])) ** 2
    got = R.feature_regression_loss(x, t, weight, bias)
    assert got.item() == pytest.approx(total / (b * ct * h * w), rel=1e-12)
    conv = F.conv2d(x, weight[:, :, None, None], bias)
    torch.testing.assert_close(R.feature_regression_loss(x, t, weight, bias, reduction="none"),
                               ((conv - t) ** 2).flatten(1).mean(1))
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w, bb: R.feature_regression_loss(x, t, w, bb, reduction="none"), args)


# --- bank update and queue -----------------------------------------------------------------------------
def test_bank_update_momentum_renorm_last_duplicate_wins():
    memory = _unit(6, 3)
    before = memory.clone()
    idx = torch.tensor([4, 1, 4, 0])
    values = torch.randn(4, 3, dtype=f64)
    R.bank_update_(memory, idx, values, momentum=0.5)
    expected = before.clone()
    for pos in range(4):  # sequential writes from the pre-call rows: the last one stays
        row = 0.5 * before[idx[pos]] + 0.5 * values[pos]
        expected[idx[pos]] = row / row.norm()
    torch.testing.assert_close(memory, expected, rtol=0, atol=1e-15)


def test_queue_push_is_a_ring_buffer():
    queue, labels = torch.zeros(5, 2), torch.full((5,), -1)
    ptr, count = torch.tensor(0), torch.tensor(0)
    seen = []
    for step in range(4):
        values = torch.randn(3, 2)
        y = torch.arange(3) + 10 * step
        R.queue_push_(queue, ptr, count, values, y, labels)
        seen += list(zip(values, y.tolist()))
    newest = seen[-5:]  # 12 pushed, size 5: slots hold rows 7..11, slot = position mod 5
    for pos, (v, y) in enumerate(seen[7:], start=7):
        assert torch.equal(queue[pos % 5], v) and labels[pos % 5].item() == y
    assert len(newest) == 5 and ptr.item() == 12 % 5 and count.item() == 5


def test_queue_push_longer_than_queue_keeps_newest():
    queue, ptr, count = torch.zeros(3, 1), torch.tensor(1), torch.tensor(0)
    R.queue_push_(queue, ptr, count, torch.arange(7.0)[:, None])
    # positions 1..7 -> slots 1,2,0,1,2,0,1: slot 1 holds 6, slot 2 holds 4, slot 0 holds 5
    assert queue.flatten().tolist() == [5.0, 6.0, 4.0] and ptr.item() == 8 % 3 and count.item() == 3


# --- queue sampling ------------------------------------------------------------------------------------
def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _uniform(seed: int, row: int, col: int) -> float:
    """csrc/sampling.h in plain Python integers."""
    s = seed & (2 ** 64 - 1)
    h = _mix32(_mix32((s & 0xFFFFFFFF) ^ 0x9E3779B9) ^ (s >> 32))
    h = _mix32(_mix32(h ^ (row & 0xFFFFFFFF)) ^ (row >> 32))
    h = _mix32(h ^ col)
    return ((_mix32(h ^ 0x85EBCA6B) >> 11) * 2 ** 32 + _mix32(h ^ 0xC2B2AE35)) / 2 ** 53


@pytest.mark.parametrize("seed", [0, -1, 2 ** 63 - 2, -(2 ** 63), 12345])
def test_counter_uniform_is_the_integer_hash(seed):
    got = R.counter_uniform(torch.tensor([seed]), 5, 7)
    want = torch.tensor([[_uniform(seed, r, c) for c in range(7)] for r in range(5)], dtype=f64)
    assert torch.equal(got, want)


def test_queue_sampling_matches_a_loop_over_the_other_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 5])
    partner = torch.tensor([2, 0, 1, 5, 7])
    seed, k = 99, 40
    got = R.queue_sample_negatives(labels, 8, partner, torch.tensor([seed]), k)
    for b, y in enumerate(partner.tolist()):
        # rows of another class among the first 8, in label order, queue order within a label
        valid = sorted((i for i in range(8) if labels[i] != y), key=lambda i: (int(labels[i]), i))
        want = [valid[min(int(_uniform(seed, b, j) * len(valid)), len(valid) - 1)] for j in range(k)]
        assert got[b].tolist() == want
    no_labels = R.queue_sample_negatives(None, 8, partner, torch.tensor([seed]), k)
    assert no_labels[3].tolist() == [int(_uniform(seed, 3, j) * 8) for j in range(k)]
    only_one_class = R.queue_sample_negatives(torch.zeros(4, dtype=torch.long), 4, torch.tensor([0, 1]),
                                              torch.tensor([seed]), 3)
    assert only_one_class[0].tolist() == [-1] * 3 and set(only_one_class[1].tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("b", [1, 2, 5])
def test_off_diagonal_lists_pairs_in_pair_indices_order(b):
    grid = torch.randn(b, b, 3)
    i, j = numerics.pair_indices(b)
    assert torch.equal(numerics.off_diagonal(grid), grid[i, j])


# --- stability and exactness of the CRD reference (the log-space form) ----------------------------------
def _crd_rows_mpmath(anchor, memory, idx, T, log_z, n_data, eps=1e-7):
    """RepDistiller's row loss at 60 significant digits: exp, then log, as in its code."""
    import mpmath
    mpmath.mp.dps = 60
    c = mpmath.mpf(idx.shape[1] - 1) / n_data
    rows = []
    for b in range(idx.shape[0]):
        total = mpmath.mpf(0)
        for k in range(idx.shape[1]):
            s = mpmath.fsum(mpmath.mpf(float(memory[idx[b, k], t])) * mpmath.mpf(float(anchor[b, t]))
                            for t in range(anchor.shape[1]))
            p = mpmath.exp(s / mpmath.mpf(T) - mpmath.mpf(log_z))
            total += -mpmath.log(p / (p + c + eps)) if k == 0 else -mpmath.log(c / (p + c + eps))
        rows.append(float(total))
    return torch.tensor(rows, dtype=f64)


@pytest.mark.parametrize("T,scale", [(0.01, 1.0), (0.01, 10.0), (0.07, 30.0)])
def test_crd_reference_is_exact_and_finite_for_logits_in_the_thousands(T, scale):
    """exp(s/T - log Z) overflows past s/T ~ 709 in float64; the log-space form does not."""
    anchor = torch.tensor([[1.0, 0.0], [0.3, -0.9]], dtype=f64) * scale
    memory = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.6, 0.8]], dtype=f64) * scale
    idx = torch.tensor([[0, 1, 2], [2, 0, 1]])
    rows = R.crd_nce_loss(anchor, memory, idx, temperature=T, log_z=0.5, n_data=3, reduction="none")
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows, _crd_rows_mpmath(anchor, memory, idx, T, 0.5, 3), rtol=1e-13, atol=0)
    a = anchor.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: R.crd_nce_loss(a, memory, idx, temperature=T, log_z=0.5, n_data=3,
                                                             reduction="none"), (a,))


def test_crd_reference_fp32_gradient_is_right_past_logit_44():
    """In fp32, exp(l) for l > 44 made (P + c + eps) round away c: gradients off by 0.49 relative."""
    anchor, memory = torch.randn(6, 16, dtype=f64), torch.randn(50, 16, dtype=f64)  # logits far beyond 44
    idx = torch.randint(50, (6, 9))

    def grad(dtype):
        a = anchor.to(dtype).requires_grad_(True)
        loss = R.crd_nce_loss(a, memory.to(dtype), idx, temperature=0.07, log_z=5.0, n_data=50)
        return torch.autograd.grad(loss, a)[0].double()

    exact = grad(f64)
    assert (torch.einsum("bkd,bd->bk", memory[idx], anchor) / 0.07 - 5.0).max() > 44
    assert float((grad(torch.float32) - exact).norm() / exact.norm()) < 1e-5


def test_crd_reference_keeps_a_float_log_z_in_float64():
    n, b, k, d = 37, 5, 9, 11
    memory, anchor = _unit(n, d), _unit(b, d)
    idx = torch.randint(n, (b, k + 1))
    log_z = 2.345678901234567  # not representable in float32
    ours = R.crd_nce_loss(anchor, memory, idx, temperature=0.07, log_z=log_z, reduction="none")
    torch.testing.assert_close(ours, _crd_rows_mpmath(anchor, memory, idx, 0.07, log_z, n), rtol=1e-13, atol=0)
