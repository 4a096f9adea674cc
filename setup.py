"""Build of gdrd_fast: Python package + kernels/ (as gdrd_fast.kernels) + compiled extensions.

- gdrd_fast._C: C++ CPU kernels and every op schema (csrc/ops.cpp, csrc/cpu/*.cpp), built whenever torch
  and a C++ compiler are there (a failure warns; env_report() then says it is missing).
- gdrd_fast._C_cuda: CUDA kernels (csrc/cuda/*.cu + their .cpp bindings).
  GDRD_BUILD_CUDA=1 (alias FORCE_CUDA=1): required, a failure stops the build.
  GDRD_BUILD_CUDA=auto (default): built when nvcc and a CUDA build of torch exist; a failure only warns.
  GDRD_BUILD_CUDA=0: never.
- TORCH_CUDA_ARCH_LIST (default "9.0"), MAX_JOBS (ninja parallelism), CUDA_HOME (derived from nvcc when unset).
Build against the installed torch: `pip install -e . --no-build-isolation`.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_mode() -> str:
    if os.environ.get("FORCE_CUDA") == "1":
        return "1"
    mode = os.environ.get("GDRD_BUILD_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"GDRD_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode


def find_cuda_home() -> str | None:
    """CUDA_HOME, or the real toolkit root that nvcc reports (nvcc may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)/bin", out.stdout + out.stderr)
    return match.group(1) if match else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels (cuBLAS etc.) that ATen's CUDA headers need when the toolkit lacks them."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  + glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: installing gdrd_fast without compiled "
                      "extensions (use `pip install -e . --no-build-isolation`)")
        return [], {}
    cxx = ["-O3", "-fopenmp"] if sys.platform != "darwin" else ["-O3"]
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    exts = [cpp_extension.CppExtension("gdrd_fast._C", cpu_sources, extra_compile_args={"cxx": cxx},
                                       extra_link_args=["-fopenmp"] if sys.platform != "darwin" else [])]
    mode = cuda_mode()
    cuda_home = find_cuda_home() if mode != "0" else None
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    want_cuda = cuda_sources and (mode == "1" or (mode == "auto" and cuda_home and torch.version.cuda))
    if want_cuda:
        if cuda_home is None:
            sys.exit("GDRD_BUILD_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME")
        if torch.version.cuda is None:
            sys.exit("GDRD_BUILD_CUDA=1 needs a CUDA build of torch (this torch is CPU-only)")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        defines = [("GDRD_ARCH_LIST", f'"{arch}"'), ("GDRD_CUDA_VERSION", f'"{torch.version.cuda}"')]
        exts.append(cpp_extension.CUDAExtension(
            "gdrd_fast._C_cuda", cuda_sources, include_dirs=nvidia_wheel_includes(), define_macros=defines,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))
    return exts, {"build_ext": optional_build_ext(cpp_extension.BuildExtension, mode)}


def optional_build_ext(base, mode):
    """BuildExtension where a failed CUDA build only warns in auto mode: `import gdrd_fast` still works."""

    class BuildExt(base):
        failed: set = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if ext.name == "gdrd_fast._C_cuda" and mode == "1":
                    raise
                self.failed.add(ext.name)
                warnings.warn(f"optional extension {ext.name} failed to build ({exc}); "
                              "gdrd_fast works without it, see gdrd_fast.env_report()")

        def copy_extensions_to_source(self):
            self.extensions = [e for e in self.extensions if e.name not in self.failed]
            super().copy_extensions_to_source()

    return BuildExt.with_options(use_ninja=bool(shutil.which("ninja")))


ext_modules, cmdclass = extensions()
setup(
    # configs/ holds only the packaged recipes (YAML): a data package, listed so setuptools ships it
    packages=find_packages(include=["gdrd_fast", "gdrd_fast.*"]) + ["gdrd_fast.configs", "gdrd_fast.kernels"],
    package_dir={"gdrd_fast.kernels": "kernels"},
    package_data={"gdrd_fast.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
