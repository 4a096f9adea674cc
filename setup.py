"""Build of gdrd_fast: Python package + kernels/ (as gdrd_fast.kernels) + compiled extensions.

- gdrd_fast._C: C++ CPU kernels, every op schema and the Python layer's host helpers (csrc/ops.cpp,
  csrc/cpu/*.cpp, csrc/autograd/*.cpp, csrc/python/*.cpp), built whenever torch and a C++ compiler are
  there (a failure warns; env_report() then says why it is missing).
- gdrd_fast._C_cuda: CUDA kernels (csrc/cuda/*.cu + their .cpp bindings).
  GDRD_BUILD_CUDA=1 (alias FORCE_CUDA=1): required, a failure stops the build.
  GDRD_BUILD_CUDA=auto (default): built when nvcc and a CUDA build of torch exist; a failure only warns.
  GDRD_BUILD_CUDA=0: never.
- TORCH_CUDA_ARCH_LIST (default "9.0"), MAX_JOBS (ninja parallelism), CUDA_HOME (derived from nvcc when unset).
Build against the installed torch: `pip install -e . --no-build-isolation`.

What was built, skipped or failed, and why, goes to gdrd_fast/_build.<python abi>.json, which env_report() reads.

This file is also the PEP 517 backend (pyproject.toml: build-backend = "setup"): setuptools' own hooks,
reached through here so that a Python without setuptools, or with one too old to build wheels, gets the
command that fixes it, not "Cannot import 'setuptools.build_meta'" or "invalid command 'bdist_wheel'".
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings

INSTALL = "python -m pip install --no-build-isolation -e ."
BUILD_TOOLS = "python -m pip install --upgrade 'setuptools>=77'"
try:
    import setuptools
    from setuptools import find_packages, setup
    from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks)
except ImportError as exc:
    raise ImportError(f"gdrd_fast builds with setuptools, which this Python lacks: run `{BUILD_TOOLS}`, "
                      f"then `{INSTALL}` again") from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
# one record per Python ABI, like the extensions themselves: builds for two Pythons can share a checkout
RECORD = os.path.join("gdrd_fast", f"_build.{sysconfig.get_config_var('SOABI')}.json")
# extension name -> "built", or why it is not: written to RECORD after the build
STATUS: dict[str, str] = {}


def require_build_tools():
    """setuptools >= 77: it reads pyproject's license expression and brings bdist_wheel (no `wheel` package
    needed); an older one fails later with "invalid command 'bdist_wheel'" or a metadata error."""
    if int(setuptools.__version__.split(".")[0]) < 77:
        sys.exit(f"error: gdrd_fast needs setuptools >= 77 to build (this Python has {setuptools.__version__}): "
                 f"run `{BUILD_TOOLS}`, then `{INSTALL}` again")


def sources_digest() -> str:
    """sha256 over setup.py and csrc/: benchmarks/gpu/run.sh uses a carried prebuilt extension only if it
    was built from exactly these sources."""
    digest = hashlib.sha256()
    for path in ["setup.py", *sorted(glob.glob("csrc/**/*", recursive=True, root_dir=ROOT))]:
        if os.path.isfile(os.path.join(ROOT, path)):
            with open(os.path.join(ROOT, path), "rb") as f:
                digest.update(path.encode() + b"\0" + f.read())
    return digest.hexdigest()


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


def import_torch():
    """torch, or an error with the commands to run: without it no kernel can be compiled, and a silent
    pure-Python install would only be discovered at the first slow call."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        sys.exit(f"error: gdrd_fast compiles its kernels against the installed torch, and torch is not "
                 f"importable here ({exc}). Run `python -m pip install torch numpy ninja`, then `{INSTALL}` "
                 "(--no-build-isolation: an isolated build would not see your torch)")
    return torch, cpp_extension


def extensions():
    torch, cpp_extension = import_torch()
    cxx = ["-O3", "-fopenmp"] if sys.platform != "darwin" else ["-O3"]
    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp")
                                           + glob.glob("csrc/python/*.cpp"))
    exts = [cpp_extension.CppExtension("gdrd_fast._C", cpu_sources, extra_compile_args={"cxx": cxx},
                                       extra_link_args=["-fopenmp"] if sys.platform != "darwin" else [])]
    mode = cuda_mode()
    cuda_home = find_cuda_home() if mode != "0" else None
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if mode == "0":
        STATUS["gdrd_fast._C_cuda"] = "not built: GDRD_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        if mode == "1":
            sys.exit(f"GDRD_BUILD_CUDA=1 needs a CUDA build of torch (torch {torch.__version__} is CPU-only)")
        STATUS["gdrd_fast._C_cuda"] = f"not built: torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        if mode == "1":
            sys.exit("GDRD_BUILD_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME")
        STATUS["gdrd_fast._C_cuda"] = "not built: no CUDA toolkit (nvcc is not on PATH and CUDA_HOME is unset)"
    else:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        defines = [("GDRD_ARCH_LIST", f'"{arch}"'), ("GDRD_CUDA_VERSION", f'"{torch.version.cuda}"')]
        exts.append(cpp_extension.CUDAExtension(
            "gdrd_fast._C_cuda", cuda_sources, include_dirs=nvidia_wheel_includes(), define_macros=defines,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]}))
    return exts, {"build_ext": recording_build_ext(cpp_extension.BuildExtension, mode, torch.__version__)}


def recording_build_ext(base, mode, torch_version):
    """BuildExtension that records each extension's outcome, and where a failed optional build only warns,
    so `import gdrd_fast` still works and env_report() says what failed."""

    class BuildExt(base):
        failed: frozenset = frozenset()

        def build_extension(self, ext):
            print(f"gdrd_fast: compiling {ext.name} ({len(ext.sources)} sources, MAX_JOBS="
                  f"{os.environ.get('MAX_JOBS', 'all cores')}); this takes minutes", flush=True)
            try:
                super().build_extension(ext)
            except Exception as exc:
                STATUS[ext.name] = (f"build failed with {type(exc).__name__}: {exc} "
                                    "(the compiler's messages are in the build log above it)")
                self.write_record()
                if ext.name == "gdrd_fast._C_cuda" and mode == "1":
                    raise
                self.failed = self.failed | {ext.name}
                warnings.warn(f"optional extension {ext.name} failed to build ({exc}); "
                              "gdrd_fast works without it, see gdrd_fast.env_report()", stacklevel=1)
            else:
                STATUS[ext.name] = f"built against torch {torch_version}"

        def copy_extensions_to_source(self):
            self.extensions = [e for e in self.extensions if e.name not in self.failed]
            super().copy_extensions_to_source()

        def run(self):
            STATUS["sources"] = sources_digest()
            super().run()
            self.write_record()

        def write_record(self):
            # in place (also editable installs): beside the sources; a wheel: in the build tree it packs
            path = os.path.join(ROOT if self.inplace or self.editable_mode else self.build_lib, RECORD)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(STATUS, f, indent=1)

    return BuildExt.with_options(use_ninja=bool(shutil.which("ninja")))


if __name__ == "__main__":
    require_build_tools()
    ext_modules, cmdclass = extensions()
    setup(
        # configs/ holds only the packaged recipes (YAML): a data package, listed so setuptools ships it;
        # benchmarks/ ships as gdrd_fast.benchmarks so that an installed `gdrd-fast bench` finds them
        packages=find_packages(include=["gdrd_fast", "gdrd_fast.*"])
        + ["gdrd_fast.configs", "gdrd_fast.kernels", "gdrd_fast.benchmarks"],
        package_dir={"gdrd_fast.kernels": "kernels", "gdrd_fast.benchmarks": "benchmarks"},
        package_data={"gdrd_fast.configs": ["*.yaml"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
