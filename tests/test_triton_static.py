"""Static GPU checks that need no GPU: every shipped Triton configuration compiles for sm_90 and sm_80,
ptxas reports 0 spill bytes and shared memory within the per-block limit, and tensor-core kernels
show wgmma in their sm_90 PTX (docs/performance/measuring.md; conventions in kernels/_aot.py).
"""
import importlib
import pkgutil

import pytest

pytest.importorskip("triton")

from gdrd_fast import backends  # noqa: E402

kernels = backends.kernels()
_aot = importlib.import_module("gdrd_fast.kernels._aot")


def _configs():
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gdrd_fast.kernels.{info.name}")
        for config in getattr(module, "STATIC_CONFIGS", []):
            for arch in ((config["arch"],) if "arch" in config else (90, 80)):
                yield pytest.param(config, arch, id=f"{info.name}-{config['name']}-sm{arch}")


CONFIGS = list(_configs())


def test_kernel_modules_ship_configs():
    assert CONFIGS, "no kernel module in kernels/ defines STATIC_CONFIGS"


@pytest.mark.triton
@pytest.mark.parametrize("config,arch", CONFIGS)
def test_compiles_without_spills(config, arch):
    report = _aot.compile_config(config, arch)
    assert report.spill_bytes == 0, f"{report}"
    assert 0 < report.registers <= 255, f"{report}"
    assert report.shared_bytes <= _aot.SHARED_MEMORY_LIMIT[arch], f"{report}"
    if arch == 90 and config["expect_wgmma"]:
        assert report.uses_wgmma, f"{config['name']}: no wgmma in the sm_90 PTX"
