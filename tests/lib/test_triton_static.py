"""Static GPU checks that need no GPU: every Triton configuration the launchers can pick on the installed
Triton compiles for sm_90 and sm_80, ptxas (Triton's own) reports 0 spill bytes and shared memory within the
per-block limit, tensor-core kernels show wgmma in their sm_90 PTX and MMAs on the operand type they were
launched for (conventions in kernels/_aot.py and kernels/_tiles.py).

Also: the launchers pick only statically checked configurations, and kernels/ imports nothing from
gdrd_fast (the ops layer imports the kernels, never the reverse).
"""
import ast
import dataclasses
import importlib
import json
import os
import pkgutil

import pytest
import torch

pytest.importorskip("triton")

from gdrd_fast import backends  # noqa: E402

kernels = backends.kernels()
_aot = importlib.import_module("gdrd_fast.kernels._aot")
_tiles = importlib.import_module("gdrd_fast.kernels._tiles")
KERNEL_DIR = os.path.dirname(kernels.__file__)
MODULES = [importlib.import_module(f"gdrd_fast.kernels.{info.name}")
           for info in pkgutil.iter_modules(kernels.__path__) if not info.name.startswith("_")]


def _configs():
    for module in MODULES:
        for config in getattr(module, "STATIC_CONFIGS", []):
            for arch in config.archs:
                yield pytest.param(config, arch, id=f"{config.name}-sm{arch}")


CONFIGS = list(_configs())


def test_kernel_modules_ship_configs_and_one_tile_table():
    assert CONFIGS, "no kernel module in kernels/ defines STATIC_CONFIGS"
    for module in MODULES:
        assert isinstance(module.TILES, dict) and all(isinstance(v, tuple) for v in module.TILES), module
        assert module.INSTALLED_TILES is _tiles.for_installed_triton(module.TILES), module


@pytest.mark.triton
@pytest.mark.parametrize("config,arch", CONFIGS)
def test_compiles_without_spills(config, arch):
    report = _aot.compile_config(config, arch)
    if os.environ.get("GDRD_STATIC_REPORT"):  # one JSON line per configuration, for CI's per-stack summary
        with open(os.environ["GDRD_STATIC_REPORT"], "a") as f:
            f.write(json.dumps(dict(dataclasses.asdict(report), mma_operands=sorted(report.mma_operands))) + "\n")
    assert report.spill_bytes == 0, f"{report}"
    assert 0 < report.registers <= 255, f"{report}"
    assert report.shared_bytes <= _aot.SHARED_MEMORY_LIMIT[arch], f"{report}"
    if arch == 90 and config.expect_wgmma:
        assert report.uses_wgmma, f"{config.name}: no wgmma in the sm_90 PTX"
    expected = frozenset({config.mma} if config.mma else ())
    assert report.mma_operands == expected, f"{config.name}: MMA operands {set(report.mma_operands)}, want {expected}"


def test_parse_ptxas_log():
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 12 bytes spill stores, "
           "4 bytes spill loads\nptxas info    : Used 96 registers, used 1 barriers")
    assert _aot.parse_ptxas_log(log) == (96, 16)
    with pytest.raises(RuntimeError):
        _aot.parse_ptxas_log("ptxas fatal: Unsupported .version 9.4")


def test_mma_operand_types():
    ptx = ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n"
           "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {...};\n"
           "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};")
    assert _aot.mma_operand_types(ptx) == {"bf16", "f16", "tf32"}


def test_tables_follow_the_installed_triton(monkeypatch):
    table = {(3, 6): "old", (3, 8): "new"}
    for installed, want in (((3, 6), "old"), ((3, 7), "old"), ((3, 8), "new"), ((3, 9), "new"), ((4, 0), "new")):
        monkeypatch.setattr(_tiles, "triton_version", lambda v=installed: v)
        assert _tiles.for_installed_triton(table) == want
    monkeypatch.setattr(_tiles, "triton_version", lambda: (3, 5))
    with pytest.raises(RuntimeError, match="older than every tile table"):
        _tiles.for_installed_triton(table)


# --- the launchers pick only what the static checks compile ---------------------------------------------
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                 torch.int32: "i32"}


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's argument types and constants."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages=3, **constexprs):
            signature = {}
            for name, arg in zip(self.fn.arg_names, args):
                if isinstance(arg, torch.Tensor):
                    signature[name] = "*" + _TRITON_TYPES[arg.dtype]
                else:
                    signature[name] = "fp32" if isinstance(arg, float) else "i32"
            self.launches.append((self.fn, signature, constexprs, num_warps, num_stages))
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Every kernel of every module replaced by a _Recorder; yields the list of launches."""
    recorded = []
    for module in MODULES:
        for name, value in vars(module).items():
            if hasattr(value, "arg_names") and hasattr(value, "run"):  # a JITFunction
                monkeypatch.setattr(module, name, _Recorder(value, recorded))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return recorded


def _assert_statically_checked(launches, arch):
    assert launches
    configs = [c for c in CONFIGS if c.values[1] == arch]
    for fn, signature, constexprs, num_warps, num_stages in launches:
        matches = [c.values[0] for c in configs
                   if c.values[0].fn is fn and c.values[0].constexprs == constexprs
                   and (c.values[0].num_warps, c.values[0].num_stages) == (num_warps, num_stages)
                   and all(signature[k] == v for k, v in c.values[0].signature.items() if v.startswith("*"))]
        assert matches, f"sm{arch}: launch {fn.__name__} {constexprs} {signature} warps={num_warps} " \
                        f"stages={num_stages} is not in STATIC_CONFIGS"


@pytest.mark.parametrize("arch", [90, 80])
def test_launchers_pick_only_static_configs(launches, monkeypatch, arch):
    for module in MODULES:
        if hasattr(module, "device_arch"):
            monkeypatch.setattr(module, "device_arch", lambda device: arch)
    feature_regression, infonce, relational = kernels.feature_regression, kernels.infonce, kernels.relational
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for teacher_dtype in {dtype, torch.float32}:
            for bias in (torch.randn(7), None):
                x, teacher, weight = torch.randn(3, 5, 4).to(dtype), torch.randn(3, 7, 4).to(teacher_dtype), \
                    torch.randn(7, 5)
                feature_regression.feature_regression_forward(x, teacher, weight, bias)
                feature_regression.feature_regression_backward(torch.rand(3), x, teacher, weight, bias)
        for d in (20, 33, 64, 100, 256, 500):
            q, bank = torch.randn(5, d).to(dtype), torch.randn(50, d).to(dtype)
            if infonce.supports(d, dtype, dtype):
                for need_grad, need_rank in ((True, False), (False, False), (True, True)):
                    infonce.infonce_bank_forward(q, q, bank, 0.1, need_grad, need_rank)
        for dim in (9, 17, 31, 64, 128):
            if not relational.supports(dim, torch.float32, dtype):
                continue
            b, k = 4, 300
            args = (torch.randn(b, dim), torch.randn(20, dim), torch.randint(20, (b, k)), torch.randn(dim, dim).to(dtype),
                    torch.randn(dim), torch.randn(b * (b - 1), dim), torch.tensor(0.5), 0.1)
            for need_grad, log_sum_exp in ((True, False), (False, False), (False, True)):
                relational.relational_negatives(*args, need_grad, log_sum_exp)
    _assert_statically_checked(launches, arch)


def test_bf16_relational_inputs_never_reach_the_kernel_as_fp16(launches, monkeypatch):
    """bf16 embeddings of magnitude 1e5 overflow fp16 (max 65504): no fp16 operand may reach the relational
    kernel's tensor-core product from a bf16 loss."""
    import gdrd_fast
    from relational_cases import N_DATA, TEMPERATURE, cast, make_case
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the 'triton' backend take CPU tensors; nothing runs
    case = cast(make_case(3, 16, 32, 10, 5), torch.bfloat16)
    with torch.no_grad():
        gdrd_fast.relational_contrastive_loss(**case, temperature=TEMPERATURE, log_z_t=torch.tensor(1.0),
                                              log_z_s=torch.tensor(1.0), n_data=N_DATA, backend="triton")
    assert launches
    for _, signature, *_ in launches:
        assert "*fp16" not in (signature["projected_ptr"], signature["fold_wt_ptr"]), signature


def test_kernels_import_nothing_from_gdrd_fast():
    """kernels/ sits below gdrd_fast (the ops layer imports the kernels): no import of gdrd_fast, absolute,
    dynamic or relative past the package."""
    offenders = []
    for name in sorted(os.listdir(KERNEL_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(KERNEL_DIR, name)) as f:
            tree = ast.parse(f.read(), name)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    targets = ["." * node.level + (node.module or "")]
                elif node.level == 0:
                    targets = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                targets = [str(node.args[0].value)]
            offenders += [f"{name}:{node.lineno} {t}" for t in targets
                          if t.split(".")[0] == "gdrd_fast" or t.startswith("..")]
    assert not offenders, f"kernels/ imports gdrd_fast: {offenders}"
