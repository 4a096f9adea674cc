"""Bad input gives a clear error naming the argument, and nothing (bank, queue) changes (ops.md section 6)."""
import pytest
import torch

import gdrd_fast
from gdrd_fast import functional as Fn
from gdrd_fast import validation

BACKENDS = ["torch", "auto"]


def _crd(**over):
    args = dict(anchor=torch.randn(4, 8), memory=torch.randn(20, 8), idx=torch.randint(20, (4, 6)))
    kw = dict(temperature=0.07, log_z=1.0)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return args, kw


CRD_CASES = [
    (dict(anchor=torch.randn(4)), ValueError, "anchor"),
    (dict(anchor=torch.randn(4, 7)), ValueError, "feature dim"),
    (dict(anchor=torch.randn(3, 8)), ValueError, "batch size"),
    (dict(anchor=torch.randn(0, 8)), ValueError, "anchor is empty"),
    (dict(anchor=torch.randint(3, (4, 8))), TypeError, "anchor"),
    (dict(idx=torch.randint(20, (4, 6)).float()), TypeError, "idx"),
    (dict(idx=torch.full((4, 6), 20)), ValueError, "idx"),
    (dict(idx=torch.full((4, 6), -1)), ValueError, "idx"),
    (dict(idx=torch.zeros(4, 1, dtype=torch.long)), ValueError, "idx"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(log_z=float("nan")), ValueError, "log_z"),
    (dict(log_z=None), ValueError, "log_z"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(anchor=torch.full((4, 8), float("nan"))), ValueError, "anchor"),
    (dict(n_data=0), ValueError, "n_data"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("over,exc,match", CRD_CASES)
def test_crd_nce_loss_rejects(over, exc, match):
    args, kw = _crd(**over)
    kw.setdefault("backend", "auto")
    with pytest.raises(exc, match=match):
        Fn.crd_nce_loss(**args, **kw)


def test_meta_device_mix_is_rejected():
    args, kw = _crd(memory=torch.randn(20, 8, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        Fn.crd_nce_loss(**args, **kw)


INFONCE_CASES = [
    (dict(query=torch.randn(4, 8, 1)), ValueError, "query"),
    (dict(positive=torch.randn(5, 8)), ValueError, "positive"),
    (dict(bank=torch.randn(10, 9)), ValueError, "feature dim"),
    (dict(batch_negatives=torch.randn(3, 8)), ValueError, "batch_negatives"),
    (dict(query=torch.randn(4, 8).to(torch.int32)), TypeError, "query"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(positive=torch.full((4, 8), float("inf"))), ValueError, "positive"),
]


@pytest.mark.parametrize("backend", BACKENDS + ["cpu"])
@pytest.mark.parametrize("over,exc,match", INFONCE_CASES)
def test_infonce_bank_loss_rejects(over, exc, match, backend):
    args = dict(query=torch.randn(4, 8), positive=torch.randn(4, 8), bank=torch.randn(10, 8))
    kw = dict(temperature=0.1, backend=backend)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(exc, match=match):
        Fn.infonce_bank_loss(**args, **kw)


def test_unavailable_backend_says_what_is_missing():
    q = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="'cuda' backend needs CUDA tensors|unavailable"):
        Fn.crd_nce_loss(q, torch.randn(5, 4), torch.randint(5, (2, 3)), log_z=1.0, backend="cuda")
    with pytest.raises(ValueError, match="has no 'cuda' backend"):
        Fn.infonce_bank_loss(q, q, q, backend="cuda")


def _relational_args(b=3, e=6, d=4, q=7, k=2):
    rc = gdrd_fast.RelationalContrastiveLoss(embed_dim=e, rel_dim=d, num_negatives=k, queue_size=q, n_data=50)
    return dict(e_t=torch.randn(b, e), e_s=torch.randn(b, e), queue_t=torch.randn(q, e), queue_s=torch.randn(q, e),
                neg_idx=torch.randint(q, (b, k)), params=rc.params())


RELATIONAL_CASES = [
    (dict(e_s=torch.randn(4, 6)), ValueError, "e_t and e_s"),
    (dict(e_t=torch.randn(1, 6), e_s=torch.randn(1, 6), neg_idx=torch.zeros(1, 2, dtype=torch.long)),
     ValueError, "at least 2"),
    (dict(queue_s=torch.randn(8, 6)), ValueError, "queue_t and queue_s"),
    (dict(neg_idx=torch.full((3, 2), 7)), ValueError, "neg_idx"),
    (dict(neg_idx=torch.zeros(2, 2, dtype=torch.long)), ValueError, "batch size"),
    (dict(params=(1, 2)), TypeError, "params"),
    (dict(e_s=torch.full((3, 6), float("nan"))), ValueError, "e_s"),
]


@pytest.mark.parametrize("over,exc,match", RELATIONAL_CASES)
def test_relational_rejects(over, exc, match):
    args = _relational_args()
    args.update(over)
    with pytest.raises(exc, match=match):
        Fn.relational_contrastive_loss(**args, temperature=0.1, log_z_t=1.0, log_z_s=1.0, n_data=50)


FEATURE_CASES = [
    (dict(teacher=torch.randn(2, 5, 3, 3)), ValueError, "teacher"),
    (dict(weight=torch.randn(4, 6)), ValueError, "input channels"),
    (dict(bias=torch.randn(3)), ValueError, "output channels"),
    (dict(student=torch.randn(2, 5, 3)), ValueError, "student"),
]


@pytest.mark.parametrize("over,exc,match", FEATURE_CASES)
def test_feature_regression_rejects(over, exc, match):
    args = dict(student=torch.randn(2, 5, 3, 3), teacher=torch.randn(2, 4, 3, 3), weight=torch.randn(4, 5),
                bias=torch.randn(4))
    args.update(over)
    with pytest.raises(exc, match=match):
        Fn.feature_regression_loss(**args)


BANK_CASES = [
    (dict(idx=torch.tensor([0, 10])), ValueError, "idx"),
    (dict(idx=torch.tensor([0, -1])), ValueError, "idx"),
    (dict(values=torch.randn(2, 3)), ValueError, "feature dim"),
    (dict(values=torch.randn(3, 4)), ValueError, "batch size"),
    (dict(values=torch.tensor([[1.0, float("nan"), 0, 0], [0, 0, 0, 1]])), ValueError, "values"),
    (dict(idx=torch.tensor([0.0, 1.0])), TypeError, "idx"),
]


@pytest.mark.parametrize("over,exc,match", BANK_CASES)
def test_bank_update_rejects_and_leaves_bank_untouched(over, exc, match):
    bank = gdrd_fast.MemoryBank(10, 4)
    before = bank.rows.clone()
    args = dict(idx=torch.tensor([0, 1]), values=torch.randn(2, 4))
    args.update(over)
    with pytest.raises(exc, match=match):
        bank.update_(**args)
    assert torch.equal(bank.rows, before)


def test_queue_rejects_and_leaves_queue_untouched():
    queue = gdrd_fast.MemoryQueue(6, 3, with_labels=True)
    queue.push_(torch.randn(2, 3), torch.tensor([1, 2]))
    state = {k: v.clone() for k, v in queue.state_dict().items()}
    bad_calls = [
        (lambda: queue.push_(torch.randn(2, 4), torch.tensor([1, 2])), "feature dim"),
        (lambda: queue.push_(torch.randn(2, 3)), "labels are required"),
        (lambda: queue.push_(torch.randn(2, 3), torch.tensor([1, 2, 3])), "batch size"),
        (lambda: queue.push_(torch.full((2, 3), float("nan")), torch.tensor([1, 2])), "values"),
        (lambda: queue.sample_negatives(torch.tensor([1]), 0), "k must be"),
    ]
    for call, match in bad_calls:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
        for k, v in queue.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_crd_module_rejects_bad_contrast_idx_without_touching_banks():
    crd = gdrd_fast.CRDLoss(5, 6, n_data=30, feat_dim=4, nce_k=3)
    state = {k: v.clone() for k, v in crd.state_dict().items()}
    with pytest.raises(ValueError, match="idx"):
        crd(torch.randn(2, 5), torch.randn(2, 6), torch.tensor([0, 1]), torch.full((2, 4), 99))
    for k, v in crd.state_dict().items():
        assert torch.equal(v, state[k]) or (torch.isnan(v).all() and torch.isnan(state[k]).all()), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_catches_every_nan_and_inf_and_no_overflowing_sum(dtype):
    big = torch.finfo(dtype).max / 2
    overflowing = torch.full((64,), big, dtype=dtype)  # finite elements whose sum overflows
    assert validation.all_finite(overflowing) and validation.all_finite(-overflowing)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(1000).to(dtype)
        t[int(torch.randint(1000, ()))] = bad
        assert not validation.all_finite(t)
    both = torch.zeros(10, dtype=dtype)
    both[2], both[7] = float("inf"), -float("inf")  # their sum is NaN: still caught
    assert not validation.all_finite(both)
