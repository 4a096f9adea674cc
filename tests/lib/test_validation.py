"""Bad input gives a clear error naming the argument, and nothing (bank, queue) changes (docs/ops/index.md)."""
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
    good_args, good_kw = _crd()
    for _ in range(2):  # after a call that passed (its structure cached), and again: a refusal is never cached
        Fn.crd_nce_loss(**good_args, **good_kw)
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
    good_args, good_kw = dict(args), dict(kw)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    for _ in range(2):  # after a call that passed (its structure cached), and again
        Fn.infonce_bank_loss(**good_args, **good_kw)
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
    good = dict(args)
    args.update(over)
    kw = dict(temperature=0.1, log_z_t=1.0, log_z_s=1.0, n_data=50)
    for _ in range(2):  # after a call that passed (its structure cached), and again
        Fn.relational_contrastive_loss(**good, **kw)
        with pytest.raises(exc, match=match):
            Fn.relational_contrastive_loss(**args, **kw)


FEATURE_CASES = [
    (dict(teacher=torch.randn(2, 5, 3, 3)), ValueError, "teacher"),
    (dict(weight=torch.randn(4, 6)), ValueError, "input channels"),
    (dict(bias=torch.randn(3)), ValueError, "output channels"),
    (dict(student=torch.randn(2, 5, 3)), ValueError, "student"),
    (dict(weight=torch.randn(4, 5, 3, 3)), ValueError, "weight"),
    (dict(teacher=torch.randn(2, 4, 3, 3, requires_grad=True)), ValueError, "teacher requires grad"),
    (dict(student=torch.full((2, 5, 3, 3), float("inf"))), ValueError, "student contains NaN or Inf"),
]


@pytest.mark.parametrize("over,exc,match", FEATURE_CASES)
def test_feature_regression_rejects(over, exc, match):
    good = dict(student=torch.randn(2, 5, 3, 3), teacher=torch.randn(2, 4, 3, 3), weight=torch.randn(4, 5),
                bias=torch.randn(4))
    args = {**good, **over}
    for _ in range(2):  # after a call that passed (its structure cached), and again
        Fn.feature_regression_loss(**good)
        with pytest.raises(exc, match=match):
            Fn.feature_regression_loss(**args)


def test_relational_module_rejects_after_a_call_that_passed():
    """The Module's own checks are cached by structure too: a bad batch, a one-sample batch and a backend
    set after construction are each refused after a good call, every time, with the queues untouched."""
    rc = gdrd_fast.RelationalContrastiveLoss(embed_dim=6, rel_dim=4, num_negatives=2, queue_size=4, n_data=50)
    e_t, e_s, labels = torch.randn(4, 6), torch.randn(4, 6), torch.arange(4)
    bad = [((torch.randn(4, 6), torch.randn(4, 5), labels), ValueError, "e_s must have shape"),
           ((torch.randn(1, 6), torch.randn(1, 6), labels[:1]), ValueError, "at least 2"),
           ((e_t, e_s, labels.float()), TypeError, "labels has unsupported dtype")]
    for _ in range(2):
        rc(e_t, e_s, labels)
        queue = rc.queue_t.values.clone()
        for args, exc, match in bad:
            with pytest.raises(exc, match=match):
                rc(*args)
        assert torch.equal(rc.queue_t.values, queue)
    rc.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        rc(e_t, e_s, labels)


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
    good = dict(idx=torch.tensor([0, 1]), values=torch.randn(2, 4))
    args = dict(good)
    args.update(over)
    for _ in range(2):  # after a call that passed (its structure cached), and again
        bank.update_(**good)
        before = bank.rows.clone()
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


@pytest.mark.parametrize("n", [1000, 600_000])  # on the CPU the C++ check: one read, or in several tasks
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_check_catches_every_nan_and_inf_and_no_overflowing_sum(dtype, n):
    big = torch.finfo(dtype).max / 2
    overflowing = torch.full((n,), big, dtype=dtype)  # finite elements whose sum overflows
    assert validation.all_finite(overflowing) and validation.all_finite(-overflowing)
    assert validation.all_finite(torch.randn(n // 10, 10).to(dtype).t())  # not contiguous
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(n).to(dtype)
        t[int(torch.randint(n, ()))] = bad
        assert not validation.all_finite(t)
        assert not validation.all_finite(t.view(10, -1).t())
        t[-1] = bad  # the last element, past every full vector
        assert not validation.all_finite(t[-1:]) and not validation.all_finite(t[-(n // 3):])
    both = torch.zeros(10, dtype=dtype)
    both[2], both[7] = float("inf"), -float("inf")  # their sum is NaN: still caught
    assert not validation.all_finite(both)


# --- a failed call changes nothing: state_dict, the module's generator and the global RNG, bit for bit -----
def _snapshot(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    generator = getattr(module, "generator", None)
    return state, (generator.get_state() if generator is not None else None), torch.get_rng_state()


def _assert_unchanged(module, snapshot, what):
    state, gen_state, rng = snapshot
    after = module.state_dict()
    assert after.keys() == state.keys(), what
    for key, value in state.items():
        assert torch.equal(after[key], value) or (
            value.is_floating_point() and torch.equal(torch.isnan(after[key]), torch.isnan(value))
            and torch.equal(after[key].nan_to_num(), value.nan_to_num())), f"{what}: {key} changed"
    if gen_state is not None:
        assert torch.equal(module.generator.get_state(), gen_state), f"{what}: the module's generator advanced"
    assert torch.equal(torch.get_rng_state(), rng), f"{what}: the global RNG advanced"


def _crd_module(**kw):
    crd = gdrd_fast.CRDLoss(6, 5, n_data=40, feat_dim=4, nce_k=7, **kw)
    crd.generator = torch.Generator().manual_seed(1)
    return crd


def _nan_at(t, row=1):
    t = t.clone()
    t[row] = float("nan")
    return t


def _relational(full: bool, distributed: bool = False, **kw):
    from gdrd_fast.distributed import DistributedRelationalContrastiveLoss
    cls = DistributedRelationalContrastiveLoss if distributed else gdrd_fast.RelationalContrastiveLoss
    rc = cls(embed_dim=6, rel_dim=4, num_negatives=3, queue_size=8, n_data=50, **kw)
    if not distributed:  # the distributed loss draws from a generator seeded by the global RNG
        rc.generator = torch.Generator().manual_seed(2)
    if full:
        rc.queue_t.push_(torch.randn(8, 6), torch.arange(8) % 3)
        rc.queue_s.push_(torch.randn(8, 6))
    return rc


_INPUTS = torch.Generator().manual_seed(0)


def _r(*shape):
    """Inputs drawn from their own generator: the test watches the global RNG."""
    return torch.randn(*shape, generator=_INPUTS)


def _bad_calls():
    """(name, module factory, call that must raise) over every Module; f = the module."""
    f_s, f_t, idx = _r(3, 6), _r(3, 5), torch.tensor([0, 5, 9])
    e, y = _r(4, 6), torch.tensor([0, 1, 2, 0])
    crd_calls = {
        "NaN f_t": lambda m: m(f_s, _nan_at(f_t), idx),
        "NaN f_s": lambda m: m(_nan_at(f_s), f_t, idx),
        "f_s too wide": lambda m: m(_r(3, 7), f_t, idx),
        "rank-1 f_s": lambda m: m(_r(6), f_t, idx),
        "int f_s": lambda m: m(f_s.int(), f_t, idx),
        "meta f_s": lambda m: m(f_s.to("meta"), f_t, idx),
        "f_t batch": lambda m: m(f_s, f_t[:2], idx),
        "idx range": lambda m: m(f_s, f_t, torch.tensor([0, 5, 40])),
        "contrast_idx range": lambda m: m(f_s, f_t, idx, torch.full((3, 8), 40)),
        "contrast_idx K=0": lambda m: m(f_s, f_t, idx, idx[:, None]),
        "NaN bank": lambda m: (m.memory_t.rows.__setitem__(3, float("nan")), m(f_s, f_t, idx)),
        "NaN embed weight": lambda m: (m.embed_s.linear.weight.data.__setitem__(0, float("nan")), m(f_s, f_t, idx)),
    }
    for name, call in crd_calls.items():
        yield f"CRDLoss {name}", _crd_module, call
    yield "CRDLoss unavailable backend", lambda: _crd_module(backend="cuda"), lambda m: m(f_s, f_t, idx)
    for name, call in crd_calls.items():
        yield f"DistributedCRDLoss {name}", lambda: _distributed_crd(), call
    rel_calls = {
        "e_s batch": lambda m: m(e, e[:3], y),
        "NaN e_s": lambda m: m(e, _nan_at(e), y),
        "NaN e_t": lambda m: m(_nan_at(e), e, y),
        "wrong D": lambda m: m(_r(4, 5), _r(4, 5), y),
        "int e_s": lambda m: m(e, e.int(), y),
        "labels length": lambda m: m(e, e, y[:3]),
        "NaN h2_b": lambda m: (m.cross_critic.bias.data.__setitem__(0, float("nan")), m(e, e, y)),
    }
    for full in (False, True):
        for name, call in rel_calls.items():
            yield f"RelationalContrastiveLoss (queue {'full' if full else 'filling'}) {name}", \
                lambda full=full: _relational(full), call
    for name, call in rel_calls.items():
        yield f"DistributedRelationalContrastiveLoss {name}", lambda: _relational(True, distributed=True), call
    yield "RelationalContrastiveLoss no negative of another class", lambda: _relational_one_class(), \
        lambda m: m(e, e, torch.tensor([0, 0, 0, 0]))
    yield "RelationalContrastiveLoss NaN queue", lambda: _relational(True), \
        lambda m: (m.queue_s.values.__setitem__(2, float("nan")), m(e, e, y))
    yield "MemoryBank NaN values", lambda: gdrd_fast.MemoryBank(10, 4), \
        lambda m: m.update_(torch.tensor([1, 2]), _nan_at(_r(2, 4)))
    yield "MemoryQueue wrong dim", lambda: gdrd_fast.MemoryQueue(5, 4, with_labels=True), lambda m: m.push_(_r(2, 3), y[:2])
    yield "MemoryQueue one class", lambda: _queue_one_class(), \
        lambda m: m.sample_negatives(torch.tensor([0]), 3, torch.Generator().manual_seed(0))
    yield "MemoryQueue one class, global RNG", lambda: _queue_one_class(), \
        lambda m: m.sample_negatives(torch.tensor([0]), 3)
    yield "InfoNCEBankLoss NaN negatives", lambda: gdrd_fast.InfoNCEBankLoss(), \
        lambda m: m(e, e, _nan_at(_r(9, 6)))
    yield "FeatureRegressionLoss NaN weight", lambda: gdrd_fast.FeatureRegressionLoss(3, 2), \
        lambda m: (m.adapter.weight.data.__setitem__(0, float("nan")), m(_r(2, 3, 4, 4), _r(2, 2, 4, 4)))


def _distributed_crd():
    from gdrd_fast.distributed import DistributedCRDLoss
    crd = DistributedCRDLoss(6, 5, n_data=40, feat_dim=4, nce_k=7)
    crd.generator = torch.Generator().manual_seed(1)
    return crd


def _relational_one_class():
    rc = _relational(False)
    rc.queue_t.push_(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
    rc.queue_s.push_(torch.randn(8, 6))
    return rc


def _queue_one_class():
    queue = gdrd_fast.MemoryQueue(5, 4, with_labels=True)
    queue.push_(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    return queue


@pytest.mark.parametrize("name,make,call", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_a_failed_call_changes_no_buffer_and_no_generator(name, make, call):
    module = make()
    # the NaN cases write into a parameter or buffer on purpose: snapshot after that write
    poison = {"NaN bank": lambda m: m.memory_t.rows.__setitem__(3, float("nan")),
              "NaN embed weight": lambda m: m.embed_s.linear.weight.data.__setitem__(0, float("nan")),
              "NaN h2_b": lambda m: m.cross_critic.bias.data.__setitem__(0, float("nan")),
              "NaN queue": lambda m: m.queue_s.values.__setitem__(2, float("nan")),
              "NaN weight": lambda m: m.adapter.weight.data.__setitem__(0, float("nan"))}
    for key, write in poison.items():
        if name.endswith(key):
            write(module)
    snapshot = _snapshot(module)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        call(module)
    _assert_unchanged(module, snapshot, name)


# --- one rule per argument on every backend -----------------------------------------------------------
CPU_BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    gdrd_fast.backends.cpu_extension() is None, reason="needs the C++ extension gdrd_fast._C"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_log_z_that_requires_grad_is_refused_on_every_backend(backend):
    """log Z is a frozen normaliser: 'torch' used to give it a gradient and 'cpu' to fail in backward."""
    args, kw = _crd(log_z=torch.tensor(1.0, requires_grad=True))
    with pytest.raises(ValueError, match="log_z requires grad"):
        Fn.crd_nce_loss(**args, **kw, backend=backend)
    with torch.no_grad():  # without autograd nothing can flow to it: accepted
        Fn.crd_nce_loss(**args, **kw, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_relational_without_negatives_is_refused(backend):
    args = _relational_args()
    args["neg_idx"] = torch.zeros(3, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="neg_idx must hold at least one negative"):
        Fn.relational_contrastive_loss(**args, temperature=0.1, log_z_t=1.0, log_z_s=1.0, n_data=50, backend=backend)


SILENT_CASES = [  # accepted silently before: now an error naming the argument
    (lambda: Fn.crd_nce_loss(**_crd(memory=torch.randn(20, 8, requires_grad=True))[0], log_z=1.0),
     ValueError, "memory requires grad"),
    (lambda: Fn.infonce_bank_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(9, 8, requires_grad=True)),
     ValueError, "bank requires grad"),
    (lambda: Fn.feature_regression_loss(torch.randn(2, 3), torch.randn(2, 4, requires_grad=True), torch.randn(4, 3)),
     ValueError, "teacher requires grad"),
    (lambda: Fn.crd_nce_loss(**_crd()[0], log_z=1.0, n_data=True), ValueError, "n_data"),
    (lambda: Fn.crd_nce_loss(**_crd()[0], log_z=1.0, eps=float("inf")), ValueError, "eps"),
    (lambda: Fn.crd_nce_loss(**_crd()[0], log_z="5"), TypeError, "log_z"),
    (lambda: gdrd_fast.MemoryQueue(4, 3, dtype=torch.int32), TypeError, "dtype"),
    (lambda: gdrd_fast.MemoryBank(4, 3, dtype=torch.int64), TypeError, "dtype"),
    (lambda: gdrd_fast.CRDLoss(4, 4, n_data=True), ValueError, "n_data"),
]


@pytest.mark.parametrize("case", range(len(SILENT_CASES)))
def test_what_was_silently_accepted_is_refused(case):
    call, exc, match = SILENT_CASES[case]
    with pytest.raises((exc, ValueError), match=match):
        call()


def test_relational_parameter_shapes_are_named():
    for field, bad in (("h2_b", torch.randn(1)), ("fts_v", torch.randn(4, 5)), ("ft_w2", torch.randn(4, 3))):
        args = _relational_args()
        args["params"] = args["params"]._replace(**{field: bad})
        with pytest.raises(ValueError, match=rf"params.{field} must have shape"):
            Fn.relational_contrastive_loss(**args, temperature=0.1, log_z_t=1.0, log_z_s=1.0, n_data=50)


NAN_CASES = [  # the NaN policy: every floating tensor a call reads, named
    ("memory", lambda: Fn.crd_nce_loss(**_crd(memory=_nan_at(torch.randn(20, 8)))[0], log_z=1.0)),
    ("bank", lambda: Fn.infonce_bank_loss(torch.randn(4, 8), torch.randn(4, 8), _nan_at(torch.randn(9, 8)))),
    ("weight", lambda: Fn.feature_regression_loss(torch.randn(2, 3), torch.randn(2, 4), _nan_at(torch.randn(4, 3)))),
    ("bias", lambda: Fn.feature_regression_loss(torch.randn(2, 3), torch.randn(2, 4), torch.randn(4, 3),
                                                _nan_at(torch.randn(4)))),
    ("teacher", lambda: Fn.feature_regression_loss(torch.randn(2, 3), _nan_at(torch.randn(2, 4)), torch.randn(4, 3))),
    ("params.h1_w", lambda: Fn.relational_contrastive_loss(
        **{**_relational_args(), "params": _relational_args()["params"]._replace(h1_w=_nan_at(torch.randn(4, 4)))},
        temperature=0.1, log_z_t=1.0, log_z_s=1.0, n_data=50)),
    ("queue_s", lambda: Fn.relational_contrastive_loss(
        **{**_relational_args(), "queue_s": _nan_at(torch.randn(7, 6))}, temperature=0.1, log_z_t=1.0, log_z_s=1.0,
        n_data=50)),
]


@pytest.mark.parametrize("name,call", NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_nan_anywhere_is_refused_by_name(name, call):
    with pytest.raises(ValueError, match=rf"^{name} contains NaN"):
        call()


CRD_MODULE_ERRORS = [  # errors name the Module's own arguments
    (lambda m: m(torch.randn(3, 7), torch.randn(3, 5), torch.tensor([0, 1, 2])), r"f_s must be \[B, s_dim=6\]"),
    (lambda m: m(torch.randn(6), torch.randn(3, 5), torch.tensor([0, 1, 2])), "f_s must have"),
    (lambda m: m(_nan_at(torch.randn(3, 6)), torch.randn(3, 5), torch.tensor([0, 1, 2])), "f_s contains NaN"),
    (lambda m: m(torch.randn(3, 6), torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.full((3, 4), 40)),
     "contrast_idx has values"),
    (lambda m: m(torch.randn(3, 6, device="meta"), torch.randn(3, 5), torch.tensor([0, 1, 2])), "f_s is on meta"),
]


@pytest.mark.parametrize("case", range(len(CRD_MODULE_ERRORS)))
def test_crd_module_errors_name_its_own_arguments(case):
    call, match = CRD_MODULE_ERRORS[case]
    with pytest.raises(ValueError, match=match):
        call(gdrd_fast.CRDLoss(6, 5, n_data=40, feat_dim=4, nce_k=3))


def test_constructors_validate_every_argument_at_once():
    with pytest.raises(ValueError) as info:
        gdrd_fast.CRDLoss(6, 5, n_data=40, nce_t=-1.0, nce_m=1.5, backend="bogus")
    assert "nce_t" in str(info.value) and "nce_m" in str(info.value) and "backend" in str(info.value)
    with pytest.raises(ValueError, match="CRDLoss: crd_nce_pair_loss has no 'triton' backend"):
        gdrd_fast.CRDLoss(6, 5, n_data=40, backend="triton")
    with pytest.raises(ValueError, match="reduction"):
        gdrd_fast.InfoNCEBankLoss(reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        gdrd_fast.RelationalContrastiveLoss(embed_dim=6, rel_dim=4, temperature=0.0, n_data=10)


def test_log_z_on_a_meta_device_is_named():
    anchor, memory, idx = torch.randn(3, 4), torch.randn(9, 4), torch.randint(9, (3, 5))
    with pytest.raises(ValueError, match=r"^log_z is on meta, the other tensors on cpu"):
        Fn.crd_nce_loss(anchor, memory, idx, log_z=torch.tensor(1.0, device="meta"))
    with pytest.raises(ValueError, match=r"^log_z_b is on meta"):
        Fn.crd_nce_pair_loss(anchor, memory, 1.0, anchor, memory, torch.tensor(1.0, device="meta"), idx,
                             names_b=dict(anchor="anchor", memory="memory", idx="idx", log_z="log_z_b"))


def test_finite_each_names_the_first_bad_tensor_and_skips_absent_ones():
    good, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    validation.finite_each(("a", "b", "c"), (good, None, good))
    with pytest.raises(ValueError, match="^c contains NaN or Inf"):
        validation.finite_each(("a", "b", "c"), (good, None, bad))
    with pytest.raises(ValueError, match="^a contains NaN or Inf"):
        validation.finite_each(("a", "b"), (bad.double().neg(), bad))
