"""MemoryBank / MemoryQueue semantics and the loss Modules' state (all in buffers, state_dict round-trips)."""
import io

import pytest
import torch

import gdrd_fast
from gdrd_fast import reference as R
from gdrd_fast import validation


def _roundtrip(module, fresh):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for (k, a), (_, b) in zip(module.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.isnan(a).all() and torch.isnan(b).all()), k
    return fresh


def test_bank_init_and_update_match_reference():
    bank = gdrd_fast.MemoryBank(50, 16, momentum=0.3)
    bound = 1 / (16 / 3) ** 0.5
    assert bank.rows.abs().max() <= bound and bank.rows.std() > bound / 3
    idx = torch.randint(50, (37,))  # duplicates are likely
    values = torch.randn(37, 16)
    expected = bank.rows.double()
    R.bank_update_(expected, idx, values.double(), 0.3)
    bank.update_(idx, values)  # 'auto' backend: the compiled kernel where built, else the reference
    torch.testing.assert_close(bank.rows.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(bank.rows[idx].norm(dim=1), torch.ones(37))


def test_bank_state_dict_roundtrip():
    bank = gdrd_fast.MemoryBank(20, 4)
    bank.update_(torch.tensor([1, 2]), torch.randn(2, 4))
    _roundtrip(bank, gdrd_fast.MemoryBank(20, 4))


def test_queue_sampling_respects_labels_and_generator():
    queue = gdrd_fast.MemoryQueue(40, 3, with_labels=True)
    labels = torch.arange(40) % 7
    queue.push_(torch.randn(40, 3), labels)
    partner = torch.randint(7, (23,))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    idx = queue.sample_negatives(partner, 200, g1)
    assert idx.shape == (23, 200)
    assert bool((queue.labels[idx] != partner[:, None]).all())
    assert torch.equal(idx, queue.sample_negatives(partner, 200, g2))
    # uniform over the valid rows: every valid row of partner 0's class complement shows up
    many = queue.sample_negatives(torch.zeros(1, dtype=torch.long), 20000)
    counts = torch.bincount(many.flatten(), minlength=40)
    valid = labels != 0
    assert bool((counts[valid] > 0).all()) and bool((counts[~valid] == 0).all())
    expected = 20000 / int(valid.sum())
    assert float((counts[valid].float() - expected).abs().max()) < 0.25 * expected


def test_queue_sampling_only_from_filled_rows_and_clear_error():
    queue = gdrd_fast.MemoryQueue(10, 2, with_labels=True)
    queue.push_(torch.randn(4, 2), torch.tensor([3, 3, 3, 5]))
    idx = queue.sample_negatives(torch.tensor([3, 5]), 50)
    assert set(idx[0].tolist()) == {3} and set(idx[1].tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="queue is empty"):
        gdrd_fast.MemoryQueue(5, 2, with_labels=True).sample_negatives(torch.tensor([9]), 3)
    full_same = gdrd_fast.MemoryQueue(3, 2, with_labels=True)
    full_same.push_(torch.randn(3, 2), torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="no negative of another class"):
        full_same.sample_negatives(torch.tensor([2, 1]), 4)


def test_queue_state_roundtrip_keeps_pointer_and_fullness():
    queue = gdrd_fast.MemoryQueue(5, 2, with_labels=True)
    queue.push_(torch.randn(7, 2), torch.arange(7))
    assert queue.is_full()
    fresh = _roundtrip(queue, gdrd_fast.MemoryQueue(5, 2, with_labels=True))
    assert fresh.is_full() and int(fresh.ptr) == 2


def test_crd_module_freezes_z_updates_banks_and_roundtrips():
    crd = gdrd_fast.CRDLoss(10, 12, n_data=60, feat_dim=8, nce_k=17)
    f_s, f_t = torch.randn(5, 10, requires_grad=True), torch.randn(5, 12)
    idx = torch.tensor([3, 7, 7, 11, 59])
    bank_before = crd.memory_s.rows.clone()
    loss = crd(f_s, f_t, idx)
    loss.backward()
    assert torch.isfinite(loss) and f_s.grad is not None and crd.embed_s.linear.weight.grad is not None
    assert torch.isfinite(crd.log_z_s) and torch.isfinite(crd.log_z_t)
    changed = (crd.memory_s.rows != bank_before).any(1)
    assert changed.nonzero().flatten().tolist() == [3, 7, 11, 59]
    z = crd.log_z_s.clone()
    crd(f_s, f_t, idx)
    assert torch.equal(crd.log_z_s, z)  # frozen after the first batch
    _roundtrip(crd, gdrd_fast.CRDLoss(10, 12, n_data=60, feat_dim=8, nce_k=17))


def test_crd_module_with_given_contrast_idx_matches_reference_formula():
    crd = gdrd_fast.CRDLoss(6, 7, n_data=30, feat_dim=5, nce_k=4).double()
    f_s, f_t = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    idx = torch.tensor([0, 1, 2])
    contrast = torch.cat([idx[:, None], torch.randint(30, (3, 4))], 1)
    banks = crd.memory_s.rows.clone(), crd.memory_t.rows.clone()
    loss = crd(f_s, f_t, idx, contrast)
    v_s, v_t = crd.embed_s(f_s), crd.embed_t(f_t)
    log_z_s = R.crd_log_z(v_s, banks[1], contrast, temperature=0.07)
    log_z_t = R.crd_log_z(v_t, banks[0], contrast, temperature=0.07)
    expected = (R.crd_nce_loss(v_s, banks[1], contrast, log_z=log_z_s)
                + R.crd_nce_loss(v_t, banks[0], contrast, log_z=log_z_t))
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)


def test_relational_module_zero_until_full_then_active():
    rc = gdrd_fast.RelationalContrastiveLoss(embed_dim=12, rel_dim=8, num_negatives=5, queue_size=10, n_data=100)
    losses = []
    for _ in range(4):
        e_t = torch.nn.functional.normalize(torch.randn(4, 12), dim=1)
        e_s = torch.nn.functional.normalize(torch.randn(4, 12), dim=1).requires_grad_()
        loss = rc(e_t, e_s, torch.randint(3, (4,)))
        loss.backward()
        losses.append(loss.item())
        assert e_s.grad is not None and rc.cross_critic.weight.grad is not None
    assert losses[:3] == [0.0, 0.0, 0.0] and losses[3] > 0  # queue of 10 holds 4, 8, 12 rows
    assert torch.isfinite(rc.log_z_s) and torch.isfinite(rc.log_z_t)
    fresh = gdrd_fast.RelationalContrastiveLoss(embed_dim=12, rel_dim=8, num_negatives=5, queue_size=10, n_data=100)
    _roundtrip(rc, fresh)
    assert fresh.queue_t.is_full()


def test_modules_move_with_to_and_keep_state_in_buffers():
    crd = gdrd_fast.CRDLoss(4, 4, n_data=10, feat_dim=3, nce_k=2)
    names = {n for n, _ in crd.named_buffers()}
    assert {"memory_s.rows", "memory_t.rows", "log_z_s", "log_z_t"} <= names
    rc = gdrd_fast.RelationalContrastiveLoss(embed_dim=4, rel_dim=3, num_negatives=2, queue_size=5, n_data=10)
    names = {n for n, _ in rc.named_buffers()}
    assert {"queue_t.values", "queue_t.labels", "queue_t.ptr", "queue_t.count", "queue_s.values",
            "log_z_t", "log_z_s"} <= names


def test_relational_state_dict_names_read_without_the_formula_and_old_names_load():
    torch.manual_seed(0)
    rc = gdrd_fast.RelationalContrastiveLoss(embed_dim=6, rel_dim=4, num_negatives=2, queue_size=5, n_data=10)
    names = set(rc.state_dict())
    assert {"teacher_relation.weight_in", "teacher_relation.bias_in", "teacher_relation.weight_out",
            "cross_relation.weight_teacher", "cross_relation.weight_student", "teacher_critic.weight",
            "cross_critic.bias"} <= names
    assert not any(n.startswith(("ft_", "fts_", "h1_", "h2_")) for n in names)
    # a checkpoint written with the formula's names (ft_w1, fts_u, h2_b, ...) still loads
    old = {k: v for k, v in rc.state_dict().items() if "." in k and k.split(".")[0] in ("queue_t", "queue_s")}
    old.update(log_z_t=rc.log_z_t, log_z_s=rc.log_z_s)
    params = rc.params()
    old.update({field: getattr(params, field).detach().clone() + 1 for field in type(params)._fields})
    fresh = gdrd_fast.RelationalContrastiveLoss(embed_dim=6, rel_dim=4, num_negatives=2, queue_size=5, n_data=10)
    fresh.load_state_dict(old)
    for field, value in fresh.params()._asdict().items():
        assert torch.equal(value, old[field]), field


def test_queue_refusal_draws_nothing_and_unchecked_partner_gets_minus_one(monkeypatch):
    """Checked (the CPU default), a partner without a negative of another class is refused before the seed
    is drawn; unchecked (the GPU default), nothing is read on the host and its row is all -1."""
    queue = gdrd_fast.MemoryQueue(6, 2, with_labels=True)
    queue.push_(torch.randn(4, 2), torch.tensor([1, 1, 1, 1]))
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    with pytest.raises(ValueError, match=r"partner_labels\[1\] = 1"):
        queue.sample_negatives(torch.tensor([2, 1]), 3, generator)
    assert torch.equal(generator.get_state(), state)
    monkeypatch.setattr(validation, "value_checks", lambda t: False)
    idx = queue.sample_negatives(torch.tensor([2, 1]), 3, generator)
    assert set(idx[0].tolist()) <= {0, 1, 2, 3} and idx[1].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_queue_push_into_a_queue_that_requires_grad(backend):
    """Only a queue asking for grad makes the push leave autograd explicitly: it is written like a buffer."""
    queue = torch.zeros(4, 3, requires_grad=True)
    ptr, count, values = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), torch.randn(2, 3)
    gdrd_fast.functional.queue_push_(queue, ptr, count, values, backend=backend)
    assert torch.equal(queue[:2].detach(), values) and int(ptr) == 2 and int(count) == 2
