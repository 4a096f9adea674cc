"""The Python layer's host helpers (csrc/python/host.cpp): the structure the argument checks are cached by,
the sampler's seed and its partner check. Each must give exactly what the torch code it replaces gives."""
import pytest
import torch

import gdrd_fast
from gdrd_fast import backends, functional as Fn, validation

pytestmark = pytest.mark.skipif(backends.host_function("signature") is None,
                                reason="needs gdrd_fast._C (built by `pip install -e .`)")


def _signature(*args):
    return backends.host_function("signature")(*args)


def test_signature_tells_apart_everything_the_checks_read():
    x = torch.randn(3, 4)
    base = _signature(x, None)
    assert _signature(torch.randn(3, 4), None) == base  # values do not matter
    assert _signature(torch.empty(3, 4).t().contiguous().t(), None) == base  # nor strides
    others = [(x.double(), None), (torch.randn(3, 4, device="meta"), None), (x.clone().requires_grad_(), None),
              (x.reshape(12), None), (x.reshape(3, 4, 1), None), (torch.randn(4, 3), None), (x, x), (None, x),
              (x,), (x, None, None), (torch.randint(5, (3, 4)), None)]
    signatures = {_signature(*args) for args in others}
    assert base not in signatures and len(signatures) == len(others)
    assert _signature(x, 1.0) is None and _signature([x]) is None and _signature() == b""


class _Counting:
    def __init__(self, fail=False):
        self.calls, self.fail = 0, fail

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise ValueError("bad structure")
        return "checked"


def test_a_passing_structure_is_checked_once_and_a_new_one_again():
    cache, checks = {}, _Counting()
    x, y = torch.randn(2, 3), torch.randn(3)
    for _ in range(3):
        assert validation.structure_checked(cache, checks, x, y) == "checked"
    assert checks.calls == 1
    validation.structure_checked(cache, checks, torch.randn(2, 3), torch.randn(3))  # the same structure
    assert checks.calls == 1
    validation.structure_checked(cache, checks, torch.randn(2, 4), y)
    assert checks.calls == 2
    with torch.no_grad():  # grad mode is part of the structure (the no-grad-input checks read it)
        validation.structure_checked(cache, checks, x, y)
    assert checks.calls == 3
    validation.structure_checked(cache, checks, x, 5)  # not a tensor: always checked, never kept
    validation.structure_checked(cache, checks, x, 5)
    assert checks.calls == 5


def test_a_failing_structure_raises_every_time():
    cache, checks = {}, _Counting(fail=True)
    for _ in range(3):
        with pytest.raises(ValueError, match="bad structure"):
            validation.structure_checked(cache, checks, torch.randn(2))
    assert checks.calls == 3 and not cache


def test_the_cache_stays_bounded():
    cache, checks = {}, _Counting()
    for n in range(1, 2 * validation._STRUCTURES_KEPT):
        validation.structure_checked(cache, checks, torch.empty(n))
    assert len(cache) <= validation._STRUCTURES_KEPT


def test_a_bank_that_asks_for_grad_is_refused_after_the_same_call_passed_without():
    """requires_grad is in the structure: a cached pass does not let a trainable bank through."""
    anchor, memory, idx = torch.randn(4, 8), torch.randn(20, 8), torch.randint(20, (4, 6))
    Fn.crd_nce_loss(anchor, memory, idx, log_z=1.0)
    with pytest.raises(ValueError, match="requires grad"):
        Fn.crd_nce_loss(anchor, memory.clone().requires_grad_(), idx, log_z=1.0)
    with torch.no_grad():  # no gradient is taken: the same bank is then fine
        Fn.crd_nce_loss(anchor, memory.clone().requires_grad_(), idx, log_z=1.0)


def test_queue_push_and_bank_pair_refuse_after_a_cached_pass():
    queue = gdrd_fast.MemoryQueue(6, 3, with_labels=True)
    queue.push_(torch.randn(2, 3), torch.tensor([1, 2]))
    state = {k: v.clone() for k, v in queue.state_dict().items()}
    with pytest.raises(ValueError, match="batch size"):
        queue.push_(torch.randn(2, 3), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels are required"):
        queue.push_(torch.randn(2, 3))
    assert all(torch.equal(v, queue.state_dict()[k]) for k, v in state.items())
    rows, ptr, count, labels = torch.zeros(6, 3), torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long), \
        torch.full((6,), -1)
    Fn.queue_push_(rows, ptr, count, torch.randn(2, 3), torch.tensor([1, 2]), labels)
    with pytest.raises(ValueError, match="labels and queue_labels go together"):
        Fn.queue_push_(rows, ptr, count, torch.randn(2, 3), torch.tensor([1, 2]), None)
    a, b = torch.randn(10, 4), torch.randn(10, 4)
    Fn.bank_update_pair_(a, torch.randn(2, 4), b, torch.randn(2, 4), torch.tensor([0, 1]), 0.5)
    before = a.clone(), b.clone()
    with pytest.raises(ValueError, match="bank rows"):
        Fn.bank_update_pair_(a, torch.randn(2, 4), torch.randn(9, 4), torch.randn(2, 4), torch.tensor([0, 1]), 0.5)
    with pytest.raises(ValueError, match="idx"):
        Fn.bank_update_pair_(a, torch.randn(2, 4), b, torch.randn(2, 4), torch.tensor([0, 10]), 0.5)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 62])
def test_draw_seed_is_torch_randint_from_the_same_state(seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(5):
        state = generator.get_state()
        expected = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), generator=generator)
        after = generator.get_state()
        generator.set_state(state)
        drawn = gdrd_fast.memory.draw_seed(generator)
        assert drawn.dtype == torch.int64 and drawn.shape == (1,) and torch.equal(drawn, expected)
        assert torch.equal(generator.get_state(), after)  # the generator moved on exactly as randint moves it
    assert backends.host_function("draw_seed")(None) is None


@pytest.mark.parametrize("trial", range(40))
def test_partner_without_negative_is_the_torch_check(trial):
    g = torch.Generator().manual_seed(trial)
    size = int(torch.randint(1, 9, (1,), generator=g))
    queue_labels = torch.randint(0, 2 if trial % 3 else 1, (size,), generator=g)
    filled = int(torch.randint(1, size + 1, (1,), generator=g))
    partners = torch.randint(0, 3, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
    queued = queue_labels[:filled]
    single = bool((queued == queued[0]).all())
    missing = (partners == queued[0]).nonzero()
    expected = int(missing[0, 0]) if single and len(missing) else -1
    scan = backends.host_function("partner_without_negative")
    assert scan(queue_labels, filled, partners) == expected
    assert scan(queue_labels.int(), filled, partners) is None  # not int64: the torch check runs instead
    queue = gdrd_fast.MemoryQueue(size, 2, with_labels=True)
    queue.push_(torch.randn(filled, 2), queued)
    if expected >= 0:
        state = torch.get_rng_state()
        with pytest.raises(ValueError, match=rf"partner_labels\[{expected}\]"):
            queue.sample_negatives(partners, 3)
        assert torch.equal(torch.get_rng_state(), state)  # refused before the seed is drawn
    else:
        assert queue.sample_negatives(partners, 3).shape == (len(partners), 3)


def test_first_non_finite_names_the_first_bad_tensor_or_hands_back_what_it_cannot_read():
    scan = backends.host_function("first_non_finite")
    good, bad = torch.randn(3, 5), torch.randn(3, 5)
    bad[2, 4] = float("nan")
    assert scan(good, good.t(), good.half()) == -1 and scan() == -1
    assert scan(good, bad, bad) == 1 and scan(bad.t()[1:]) == 0  # any strides
    inf = torch.zeros(7, dtype=torch.bfloat16)
    inf[6] = float("-inf")
    assert scan(good, inf) == 1
    # not a floating-point CPU tensor: None, and validation checks it in torch instead
    assert scan(good, torch.arange(3)) is None and scan(good, 1.0) is None
    assert scan(torch.empty(3, device="meta")) is None


def test_what_aten_cannot_read_is_handed_back_not_a_crash():
    """No C++ exception may leave a CPython function: each of these would abort the interpreter."""
    nested = torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])
    assert _signature(torch.randn(2), nested) is None
    assert backends.host_function("first_non_finite")(nested) is None
    if hasattr(torch, "float8_e4m3fn"):  # a floating dtype the scan does not read
        assert backends.host_function("first_non_finite")(torch.zeros(3).to(torch.float8_e4m3fn)) is None
    assert backends.host_function("first_non_finite")(torch.randn(4, 4).to_sparse()) is None
    scan = backends.host_function("partner_without_negative")
    assert scan(torch.tensor([1, 1]), 2 ** 70, torch.tensor([1])) is None
    assert scan(torch.tensor([1, 1]), 2, torch.tensor([1])) == 0  # and it still answers afterwards
