"""The CUDA extension as built on a GPU-less machine: it holds sm_90 SASS for every kernel file, spills
nothing, imports, and registers a CUDA kernel for every gdrd_fast_C op.

Skipped when gdrd_fast._C_cuda was not built; CI sets GDRD_REQUIRE_CUDA_BUILD=1 so a missing build fails.
"""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

from gdrd_fast import backends

CSRC_CUDA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
OPS = ["crd_nce_forward", "crd_nce_pair_forward", "bank_update_", "bank_update_pair_", "queue_push_",
       "queue_sample_negatives"]


@pytest.fixture(scope="module")
def library():
    spec = importlib.util.find_spec("gdrd_fast._C_cuda")
    if spec is None:
        if os.environ.get("GDRD_REQUIRE_CUDA_BUILD") == "1":
            pytest.fail("gdrd_fast._C_cuda is not built (GDRD_REQUIRE_CUDA_BUILD=1)")
        pytest.skip("gdrd_fast._C_cuda not built: GDRD_BUILD_CUDA=1 python setup.py build_ext --inplace")
    return spec.origin


def cuobjdump() -> str:
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        bundled = ""
    candidates = [bundled, shutil.which("cuobjdump") or "",
                  os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump")]
    found = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if found is None:
        pytest.skip("no cuobjdump (triton's bundle or the CUDA toolkit)")
    return found


def test_every_kernel_file_has_sm90_sass(library):
    out = subprocess.run([cuobjdump(), "--list-elf", library], capture_output=True, text=True, check=True).stdout
    cubins = set(re.findall(r"(\w+)\.sm_90\.cubin", out))
    sources = {f[:-3] for f in os.listdir(CSRC_CUDA) if f.endswith(".cu")}
    assert sources and sources <= cubins, f"sm_90 cubins {sorted(cubins)} miss {sorted(sources - cubins)}"


def test_kernels_spill_nothing(library):
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", library], capture_output=True, text=True,
                         check=True).stdout
    local = [int(x) for x in re.findall(r"LOCAL:(\d+)", out)]
    assert local and max(local) == 0, "a kernel uses local memory (register spills or a stack array)"


def test_imports_without_gpu_and_registers_cuda_kernels(library):
    module = backends.cuda_extension()
    assert module is not None, backends.extension_error("gdrd_fast._C_cuda")
    assert "9.0" in module.ARCH_LIST and module.CUDA_VERSION == torch.version.cuda
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gdrd_fast_C::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gdrd_fast_C::{op}", "CPU"), op
