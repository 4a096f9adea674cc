"""Compiled bank updates (csrc/cpu/bank_update.cpp; csrc/cuda/bank_update.cu on a GPU) against the
float64 reference: momentum, renormalisation, last duplicate wins, two banks in one call; and the MemoryQueue
kernels (ring-buffer push, counter-hash negative sampling) index for index against the reference."""
import pytest
import torch

from gdrd_fast import MemoryBank, MemoryQueue, backends, reference, validation
from gdrd_fast import functional
from gdrd_fast.ops import memory as memory_ops

from memory_cases import TOL, bank_case, empty_queue, expected_bank

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="needs the C++ extension gdrd_fast._C")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n, d, b", [(7, 31, 20), (1000, 128, 65), (3, 5, 1)])
def test_bank_update_matches_reference(device, bank_dtype, idx_dtype, n, d, b):
    bank, idx, values = bank_case(n, d, b, bank_dtype, idx_dtype, device)
    want = expected_bank(bank, idx, values, 0.3)
    functional.bank_update_(bank, idx, values, 0.3, backend=device)
    # rows the update does not touch are left bit for bit
    untouched = torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, idx.long(), False)
    assert torch.equal(bank[untouched].double(), want[untouched])
    torch.testing.assert_close(bank.double(), want, rtol=0, atol=TOL[bank_dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_last_duplicate_wins_deterministically(device):
    bank, _, values = bank_case(10, 16, 40, torch.float32, torch.int64, device)
    idx = torch.full((40,), 4, device=device)
    idx[::3] = 7
    want = expected_bank(bank, idx, values, 0.5)
    last_only = bank.clone()  # row 4 written from values[38] only, row 7 from values[39] only
    functional.bank_update_(last_only, idx[[38, 39]], values[[38, 39]], 0.5, backend=device)
    for _ in range(3):
        got = bank.clone()
        functional.bank_update_(got, idx, values, 0.5, backend=device)
        assert torch.equal(got, last_only)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_pair_update_equals_two_single_updates(device, bank_dtype):
    bank_a, idx, values_a = bank_case(500, 100, 47, bank_dtype, torch.int64, device)
    bank_b, _, values_b = bank_case(500, 100, 47, bank_dtype, torch.int64, device)
    single_a, single_b = bank_a.clone(), bank_b.clone()
    functional.bank_update_(single_a, idx, values_a, 0.5, backend=device)
    functional.bank_update_(single_b, idx, values_b, 0.5, backend=device)
    functional.bank_update_pair_(bank_a, values_a, bank_b, values_b, idx, 0.5, backend=device)
    assert torch.equal(bank_a, single_a) and torch.equal(bank_b, single_b)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_bank_module_uses_kernel_and_rejects_bad_input(device, monkeypatch):
    monkeypatch.setattr(validation, "_checks_on_gpu", True)  # value checks sync, so GPU runs them on request
    bank = MemoryBank(30, 8, momentum=0.5, backend=device).to(device)
    before = bank.rows.clone()
    with pytest.raises(ValueError, match="idx"):
        bank.update_(torch.tensor([1, 30], device=device), torch.randn(2, 8, device=device))
    with pytest.raises(ValueError, match="values"):
        bank.update_(torch.tensor([1, 2], device=device), torch.full((2, 8), float("nan"), device=device))
    assert torch.equal(bank.rows, before)
    idx, values = torch.tensor([5, 2, 5], device=device), torch.randn(3, 8, device=device)
    want = expected_bank(before, idx, values, 0.5)
    bank.update_(idx, values)
    torch.testing.assert_close(bank.rows.double(), want, rtol=0, atol=1e-6)


# --- MemoryQueue kernels (csrc/cpu/queue.cpp, csrc/cuda/queue.cu) ----------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("queue_dtype, value_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                      (torch.float16, torch.float16), (torch.float64, torch.float32)])
@pytest.mark.parametrize("d", [1, 3, 31, 128])
@pytest.mark.parametrize("with_labels", [True, False])
def test_queue_push_matches_reference(device, queue_dtype, value_dtype, d, with_labels):
    size = 7
    ours, ref = empty_queue(size, d, queue_dtype, device, with_labels), empty_queue(size, d, queue_dtype, device,
                                                                                    with_labels)
    for n in [3, 1, 5, 16, 2]:  # wraps around, and a push longer than the queue keeps the newest rows
        values = torch.randn(n, d, dtype=value_dtype, device=device)
        labels = torch.randint(100, (n,), dtype=torch.int32, device=device) if with_labels else None
        queue, ptr, count, queue_labels = ours
        functional.queue_push_(queue, ptr, count, values, labels, queue_labels, backend=device)
        reference.queue_push_(ref[0], ref[1], ref[2], values, labels, ref[3])
        for got, want in zip(ours, ref):
            assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("d", [63, 128])  # 63: rows of 252 bytes, so most destinations are not 16-byte aligned
def test_large_queue_push_bypassing_the_cache_matches_reference(d):
    """A ring of >= 4 MiB takes pushes of >= 64 KiB with streaming stores (csrc/cpu/queue.cpp): same rows."""
    size = (5 << 20) // (4 * d)
    ours, ref = empty_queue(size, d, torch.float32, "cpu", True), empty_queue(size, d, torch.float32, "cpu", True)
    for start in (0, 3, size - 150):  # from slot 0, from a slot off the alignment, and wrapping around the end
        for queue in (ours, ref):
            queue[1].fill_(start)
        values, labels = torch.randn(300, d), torch.randint(100, (300,))
        functional.queue_push_(*ours[:3], values, labels, ours[3], backend="cpu")
        reference.queue_push_(*ref[:3], values, labels, ref[3])
        for got, want in zip(ours, ref):
            assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("filled, batch, k", [(1, 1, 1), (50, 47, 123), (333, 5, 1000), (4096, 64, 513)])
@pytest.mark.parametrize("classes", [None, 1, 3, 40])
def test_queue_sampling_kernel_draws_the_reference_indices(device, filled, batch, k, classes):
    queue_labels = None if classes is None else torch.randint(classes, (filled + 3,), device=device)
    partner = torch.randint(classes or 5, (batch,), dtype=torch.int32, device=device)
    for seed in [0, -1, 2 ** 63 - 2, int(torch.randint(-2 ** 63, 2 ** 63 - 1, ()))]:
        seed_t = torch.tensor([seed], device=device)
        got = functional.queue_sample_negatives(queue_labels, filled, partner, seed_t, k, backend=device)
        want = reference.queue_sample_negatives(queue_labels, filled, partner, seed_t, k)
        assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_queue_sampling_is_uniform_over_the_other_class(device):
    labels = torch.arange(60, device=device) % 4
    partner = torch.zeros(200, dtype=torch.long, device=device)
    idx = functional.queue_sample_negatives(labels, 60, partner, torch.tensor([7], device=device), 900,
                                            backend=device)
    counts = torch.bincount(idx.flatten(), minlength=60).double().cpu()
    valid = (labels != 0).cpu()
    assert bool((counts[~valid] == 0).all())
    expected = idx.numel() / int(valid.sum())
    chi2 = float(((counts[valid] - expected) ** 2 / expected).sum())
    # 44 degrees of freedom: P(chi2 > 90) < 1e-4 for uniform draws
    assert chi2 < 90, chi2


@pytest.mark.parametrize("device", DEVICES)
def test_memory_queue_uses_kernels_and_reproduces_from_generator(device):
    def filled_queue(backend):
        torch.manual_seed(3)
        queue = MemoryQueue(64, 9, with_labels=True, backend=backend).to(device)
        for _ in range(5):
            queue.push_(torch.randn(23, 9, device=device), torch.randint(6, (23,), device=device))
        return queue

    ours, ref = filled_queue(device), filled_queue("torch")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    partner = torch.randint(6, (17,), device=device)
    draws = [q.sample_negatives(partner, 31, torch.Generator(device).manual_seed(11)) for q in (ours, ours, ref)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    assert bool((ours.labels[draws[0]] != partner[:, None]).all())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    same_class = MemoryQueue(4, 2, with_labels=True, backend=device).to(device)
    same_class.push_(torch.randn(4, 2, device=device), torch.full((4,), 3, device=device))
    with pytest.raises(ValueError, match=r"partner_labels\[1\] = 3"):
        same_class.sample_negatives(torch.tensor([1, 3], device=device), 5)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


@pytest.mark.cuda
def test_queue_sampling_draws_the_same_indices_on_cpu_and_gpu():
    labels, partner = torch.randint(9, (777,)), torch.randint(9, (31,))
    seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,))
    on_cpu = functional.queue_sample_negatives(labels, 700, partner, seed, 257, backend="cpu")
    on_gpu = functional.queue_sample_negatives(labels.cuda(), 700, partner.cuda(), seed.cuda(), 257, backend="cuda")
    assert torch.equal(on_cpu, on_gpu.cpu())
    # through the module: one CPU generator seeded alike gives both queues the same negatives
    queues = [MemoryQueue(777, 3, with_labels=True).to(device) for device in ("cpu", "cuda")]
    for queue in queues:
        queue.push_(torch.zeros(777, 3, device=queue.values.device), labels.to(queue.values.device))
    draws = [q.sample_negatives(partner.to(q.values.device), 64, torch.Generator().manual_seed(5)) for q in queues]
    assert torch.equal(draws[0], draws[1].cpu())


def test_compiled_memory_ops_pass_opcheck():
    """Schemas (what each op mutates), fake kernels and dispatch hold up for torch.compile."""
    assert memory_ops.PUSH_IMPLS["cpu"].unavailable(torch.device("cpu")) is None  # registers the fake kernels
    ops = {name: getattr(torch.ops.gdrd_fast_C, name).default
           for name in ("bank_update_", "bank_update_pair_", "queue_push_", "queue_sample_negatives")}
    bank, idx, values = bank_case(50, 16, 9, torch.float32, torch.int64, "cpu")
    torch.library.opcheck(ops["bank_update_"], (bank, idx, values, 0.5))
    torch.library.opcheck(ops["bank_update_pair_"], (bank, values, bank.clone(), values.clone(), idx, 0.5))
    queue, ptr, count, queue_labels = empty_queue(11, 16, torch.float32, "cpu", with_labels=True)
    torch.library.opcheck(ops["queue_push_"], (queue, ptr, count, values, torch.arange(9), queue_labels))
    torch.library.opcheck(ops["queue_sample_negatives"],
                          (torch.randint(3, (11,)), 11, torch.randint(3, (5,)), torch.tensor([7]), 13))
    torch.library.opcheck(ops["queue_sample_negatives"], (None, 11, torch.zeros(5, dtype=torch.long),
                                                          torch.tensor([7]), 13))


def test_the_written_arguments_table_matches_the_op_schemas():
    assert memory_ops.PUSH_IMPLS["cpu"].unavailable(torch.device("cpu")) is None
    for name, written in memory_ops.WRITTEN.items():
        schema = getattr(torch.ops.gdrd_fast_C, name).default._schema
        assert written == tuple(i for i, arg in enumerate(schema.arguments)
                                if arg.alias_info is not None and arg.alias_info.is_write), name


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_in_place_updates_bump_the_version_so_a_stale_backward_fails(backend):
    """A backward that saved a bank or queue which an update then overwrote must raise, as with torch's own
    in-place ops; without the version bump it would silently use the new rows."""
    bank, idx, values = bank_case(50, 16, 9, torch.float32, torch.int64, "cpu")
    other = bank.clone()
    weight = torch.randn(16, requires_grad=True)
    stale = [(bank * weight).sum(), (other * weight).sum()]  # both save their bank for backward
    before = bank._version, other._version
    functional.bank_update_(bank, idx, values, 0.5, backend=backend)
    assert bank._version > before[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale[0].backward()
    functional.bank_update_pair_(bank, values, other, values.clone(), idx, 0.5, backend=backend)
    assert bank._version > before[0] + 1 and other._version > before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale[1].backward()

    queue, ptr, count, queue_labels = empty_queue(11, 16, torch.float32, "cpu", with_labels=True)
    saved = (queue * weight).sum()
    versions = [t._version for t in (queue, ptr, count, queue_labels)]
    functional.queue_push_(queue, ptr, count, values, torch.arange(9), queue_labels, backend=backend)
    assert all(t._version > v for t, v in zip((queue, ptr, count, queue_labels), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
