"""Dispatch tells the truth: every op and backend at each declared limit and one past it, resolve() naming
the backend that actually ran, the declared limits matching the kernels' own, and the one rule
(docs/design/index.md) for a name that is unknown, unavailable or deprecated."""
import dataclasses
import os
import re
import warnings

import pytest
import torch

from gdrd_fast import backends
from gdrd_fast.ops import crd_nce
from import_graph import ROOT
from op_registry import BY_NAME, OPS

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Decisions are cached per (op, backend, device type, dtype): tests that change declarations start and
    end with an empty cache. The small-call route to the reference (Op.reference_below) is off: these tests
    are about the declared backends, and test_a_small_cpu_call_runs_the_reference is about that route."""
    import gdrd_fast.functional  # noqa: F401  (registers every op)
    for table in backends.ops().values():
        monkeypatch.setattr(table, "reference_below", 0)
    backends.forget_decisions()
    yield
    backends.forget_decisions()


def test_the_registry_holds_every_op():
    import gdrd_fast.functional  # noqa: F401  (registers every op)
    assert sorted(BY_NAME) == sorted(backends.ops()), "tests/lib/op_registry.py must list every op"


def _record_runs(monkeypatch, table: backends.Op) -> list[str]:
    """Every backend of `table` wrapped so that loading its per-row function, or running its one-block node
    (which returns None where it does not apply), records the backend's name."""
    ran = []
    for name, backend in table.backends.items():
        def load(name=name, inner=backend.load):
            ran.append(name)
            return inner()

        def one_block(*args, name=name, inner=backend.one_block):
            loss = inner(*args)
            if loss is not None:
                ran.append(name)
            return loss

        replaced = dict(load=load) if backend.one_block is None else dict(load=load, one_block=one_block)
        monkeypatch.setitem(table.backends, name, dataclasses.replace(backend, **replaced))
    return ran


@pytest.mark.parametrize("entry", OPS, ids=lambda e: e.name)
def test_resolve_names_what_runs_for_every_cpu_backend(entry, monkeypatch, fresh_dispatch):
    table = entry.table
    ran = _record_runs(monkeypatch, table)
    for backend in ["auto", *table.available(CPU)]:
        for dtype in (torch.float32, torch.float64):
            ran.clear()
            backends.forget_decisions()  # the memory ops keep what they loaded (Op.load_for)
            if backend != "auto" and dtype not in table[backend].dtypes:  # named, it refuses the dtype
                with pytest.raises(ValueError, match=f"backend '{backend}' cannot run this call"):
                    entry.run(backend, dtype, CPU)
                assert ran == []
                continue
            entry.run(backend, dtype, CPU)
            assert ran == [table.resolve(backend, CPU, dtype, **entry.sizes)], (backend, dtype)


SIZED = [e for e in OPS if e.sizes]


@pytest.mark.parametrize("entry", SIZED, ids=lambda e: e.name)
def test_a_size_past_a_limit_runs_the_exact_path_under_auto_and_raises_when_named(entry, monkeypatch,
                                                                                 fresh_dispatch):
    """The functional entry passes its sizes to resolve(): a backend limited to the call's size runs it; one
    past the limit, `auto` runs the exact backend and resolve() says so, while the backend named explicitly
    raises its reason and runs nothing."""
    table = entry.table
    asked = next(n for n in table.available(CPU) if n != table.exact)
    monkeypatch.setitem(backends.AUTO, "cpu", (asked,))
    (size, value), = entry.sizes.items()
    ran = _record_runs(monkeypatch, table)
    limited = dataclasses.replace(table[asked], max_sizes=lambda dtype: {size: value})
    monkeypatch.setitem(table.backends, asked, limited)
    for name, at, expected in ((asked, value, asked), ("auto", value, asked), ("auto", value + 1, table.exact)):
        ran.clear()
        entry.run(name, torch.float32, CPU, **{size: at})
        assert table.resolve(name, CPU, torch.float32, **{size: at}) == expected
        assert ran == [expected], (name, size, at)
    ran.clear()
    reason = f"{asked}: {size}={value + 1} > {value}, its largest"
    with pytest.raises(ValueError, match=f"backend '{asked}' cannot run this call: {size}={value + 1} > {value}"):
        entry.run(asked, torch.float32, CPU, **{size: value + 1})
    assert ran == []
    assert table.explain(asked, CPU, torch.float32, **{size: value + 1}) == (None, [reason])
    assert table.explain("auto", CPU, torch.float32, **{size: value + 1}) == (table.exact, [reason])


def _declared():
    """(op, backend, dtype, size name, limit) for every declared limit of every backend."""
    import gdrd_fast.functional  # noqa: F401
    for entry in OPS:
        for name, backend in entry.table.backends.items():
            for dtype in backend.dtypes:
                for size, limit in backend.limits(dtype).items():
                    yield pytest.param(entry, name, dtype, size, limit, id=f"{entry.name}-{name}-{dtype}-{size}")


DECLARED = list(_declared()) if backends.triton_version() else []


@pytest.mark.parametrize("entry,name,dtype,size,limit", DECLARED)
def test_every_declared_limit_and_one_past(entry, name, dtype, size, limit, monkeypatch, fresh_dispatch):
    """Read from the declarations alone (no GPU needed: the backend is made available on 'cuda')."""
    table = entry.table
    monkeypatch.setitem(table.backends, name, dataclasses.replace(table[name], unavailable=backends.anywhere))
    assert size in entry.sizes, f"{entry.name} declares {size} but its functional entry does not pass it"
    assert table.resolve(name, CUDA, dtype, **{size: limit}) == name
    with pytest.raises(ValueError, match=f"{size}={limit + 1} > {limit}, its largest"):
        table.resolve(name, CUDA, dtype, **{size: limit + 1})
    monkeypatch.setitem(backends.AUTO, "cuda", (name,))
    assert table.resolve("auto", CUDA, dtype, **{size: limit}) == name
    assert table.resolve("auto", CUDA, dtype, **{size: limit + 1}) == table.exact
    assert table.explain(name, CUDA, dtype, **{size: limit + 1}) == (
        None, [f"{name}: {size}={limit + 1} > {limit}, its largest"])


def test_the_limits_the_issue_named_are_declared():
    assert crd_nce.IMPLS["cuda"].limits(torch.float32) == {"d": 512}
    assert crd_nce.PAIR_IMPLS["cuda"].limits(torch.float64) == {"d": 512}
    assert crd_nce.IMPLS["cpu"].limits(torch.float32) == {}
    if backends.triton_version():
        from gdrd_fast.ops import relational
        assert relational.IMPLS["triton"].limits(torch.float32) == {"relation_dim": 128}
        assert relational.LOG_Z_IMPLS["triton"].limits(torch.float16) == {"relation_dim": 128}


def test_crd_cuda_limit_is_the_kernels_own():
    """csrc/cuda/crd_nce.cu keeps kMaxPerLane values per lane of a 32-lane warp; bindings.cpp refuses more."""
    source = open(os.path.join(ROOT, "csrc", "cuda", "crd_nce.cu")).read()
    per_lane = int(re.search(r"constexpr int kMaxPerLane = (\d+);", source).group(1))
    assert "max_dim() { return kMaxPerLane * 32; }" in source
    assert crd_nce.CUDA_MAX_D == per_lane * 32


@pytest.mark.parametrize("entry", [e for e in OPS if e.triton_kernel], ids=lambda e: e.name)
def test_float64_and_half_on_triton(entry, fresh_dispatch):
    """The Triton kernels compute fp16, bf16 and fp32: float64 under 'auto' runs the exact path, and asked of
    'triton' by name raises the reason."""
    pytest.importorskip("triton")
    table = entry.table
    for backend in ("triton", "auto"):
        assert table.resolve(backend, CUDA, torch.float32, **entry.sizes) == "triton"
    assert table.resolve("auto", CUDA, torch.float64, **entry.sizes) == table.exact == "chunked"
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: it computes .*not torch.float64"):
        table.resolve("triton", CUDA, torch.float64, **entry.sizes)
    assert table.explain("auto", CUDA, torch.float64, **entry.sizes)[1] == [
        "triton: it computes torch.float16, torch.bfloat16, torch.float32, not torch.float64"]


def test_an_unavailable_backend_raises_its_reason():
    with pytest.raises(RuntimeError, match=r"crd_nce_loss: backend 'cuda' is unavailable: .*CUDA tensors"):
        BY_NAME["crd_nce_loss"].run("cuda", torch.float32, CPU)
    with pytest.raises(ValueError, match="has no 'triton' backend"):
        BY_NAME["crd_nce_loss"].run("triton", torch.float32, CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        BY_NAME["infonce_bank_loss"].run("gpu", torch.float32, CPU)


ALIASED = ["infonce_bank_loss", "infonce_bank_pairs_loss", "relational_contrastive_loss", "relational_log_z",
           "feature_regression_loss"]  # where 'cpu' named the chunked path before it had its own name


def test_only_the_old_chunked_ops_keep_the_alias():
    assert sorted(e.name for e in OPS if e.table.aliases) == sorted(ALIASED)


@pytest.mark.parametrize("name", ALIASED)
def test_cpu_is_a_deprecated_alias_of_chunked_where_it_meant_the_chunked_path(name, fresh_dispatch):
    entry = BY_NAME[name]
    table = entry.table
    assert "cpu" not in table.backends and table.aliases == {"cpu": "chunked"}
    with pytest.warns(DeprecationWarning, match="'cpu' is deprecated, use 'chunked'"):
        old = entry.run("cpu", torch.float64, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = entry.run("chunked", torch.float64, CPU)
    assert table.resolve("cpu", CPU, torch.float64) == "chunked"
    assert type(old) is type(new)


def test_cpu_still_means_the_cpp_extension_for_the_compiled_ops():
    for name in ("crd_nce_loss", "crd_nce_pair_loss", "bank_update_", "bank_update_pair_", "queue_push_",
                 "queue_sample_negatives"):
        table = BY_NAME[name].table
        assert "cpu" in table.backends and not table.aliases, name


@pytest.mark.cuda
def test_crd_past_the_cuda_kernels_width_runs_the_exact_path_on_gpu(monkeypatch, fresh_dispatch):
    """D = 513 on CUDA under 'auto': the reference runs (the CUDA kernel would refuse it); D = 512 runs the kernel."""
    from gdrd_fast import functional, reference
    for name in ("crd_nce_loss", "crd_nce_pair_loss"):
        ran = _record_runs(monkeypatch, BY_NAME[name].table)
        for d, expected in ((512, "cuda"), (513, "torch")):
            ran.clear()
            BY_NAME[name].run("auto", torch.float32, CUDA, d=d)
            assert ran == [expected] == [BY_NAME[name].table.resolve("auto", CUDA, torch.float32, d=d)], (name, d)
    anchor = torch.randn(4, 513, device="cuda", dtype=torch.float64)
    memory = torch.nn.functional.normalize(torch.randn(40, 513, device="cuda", dtype=torch.float64), dim=1)
    idx = torch.randint(40, (4, 9), device="cuda")
    got = functional.crd_nce_loss(anchor.float(), memory.float(), idx, log_z=3.0)
    want = reference.crd_nce_loss(anchor, memory, idx, log_z=3.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


class _Namespaces(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the namespace of every op that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("entry", OPS, ids=lambda e: e.name)
def test_eager_calls_skip_the_custom_ops(entry):
    """Outside torch.compile each op runs its autograd.Function twin: torch.library's dispatch of the
    gdrd_fast:: custom ops (the compile and opcheck path) is not paid, forward or backward."""
    from gdrd_fast.ops import infonce
    with _Namespaces() as control:
        q = torch.randn(3, 4)
        infonce.infonce_bank_op(q, q, torch.randn(5, 4), 0.1, "chunked", False)
    assert "gdrd_fast" in control.seen  # the mode does see a custom op
    with _Namespaces() as mode:
        out = entry.run("auto", torch.float32, CPU)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward()
    assert "gdrd_fast" not in mode.seen, entry.name


SMALL_ROUTED = [e for e in OPS if backends.op(e.name).reference_below]


def test_some_ops_route_small_cpu_calls_to_the_reference():
    import gdrd_fast.functional  # noqa: F401
    assert sorted(e.name for e in SMALL_ROUTED) == ["infonce_bank_pairs_loss", "relational_contrastive_loss",
                                                     "relational_log_z"]


@pytest.mark.parametrize("entry", SMALL_ROUTED, ids=lambda e: e.name)
def test_a_small_cpu_call_runs_the_reference(entry, monkeypatch):
    """Under 'auto' on the CPU a call whose dense block is at most reference_below elements runs the
    reference (cheaper on the host than the fused path's autograd.Function); a larger one, or a backend
    named explicitly, runs as declared."""
    table = entry.table
    ran = _record_runs(monkeypatch, table)
    entry.run("auto", torch.float32, CPU)
    assert ran == ["torch"]
    ran.clear()
    monkeypatch.setattr(table, "reference_below", 1)  # the registry's small call is now above the bound
    entry.run("auto", torch.float32, CPU)
    assert ran == [table.resolve("auto", CPU, torch.float32, **entry.sizes)] != ["torch"]
    monkeypatch.setattr(table, "reference_below", 1 << 30)
    for named in table.available(CPU):
        ran.clear()
        entry.run(named, torch.float32, CPU)
        assert ran == [named]
    assert table.resolve("auto", CUDA, torch.float32, work=1, **entry.sizes) != "torch" or \
        table.exact == "torch"  # the route is the CPU's alone
