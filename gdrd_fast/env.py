"""What this install can run: compiled extensions, Triton, devices (`python -m gdrd_fast env`)."""
from __future__ import annotations

import json
import os
import platform
import shutil
import sysconfig

import torch

from . import backends

REBUILD = "pip install -e . --no-build-isolation"
# written by setup.py's build: for each compiled part, "built against torch ..." or why it is not there
_BUILD_RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             f"_build.{sysconfig.get_config_var('SOABI')}.json")


def build_record() -> dict[str, str]:
    """What the last build of this copy of gdrd_fast did per extension; {} when it was never built."""
    try:
        with open(_BUILD_RECORD) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def why_missing(name: str) -> str:
    """Why the compiled part `name` ("gdrd_fast._C" or "gdrd_fast._C_cuda") is not loaded, in words."""
    import_error = backends.extension_error(name)
    if name == "gdrd_fast._C_cuda":
        if backends.cpu_extension() is None:
            return "needs gdrd_fast._C (it holds the op schemas), which is missing"
        if torch.version.cuda is None:
            return f"not built: torch {torch.__version__} is a CPU-only build"
    outcome = build_record().get(name)
    if outcome is None:
        if name == "gdrd_fast._C_cuda" and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
            return "not built: no CUDA toolkit (nvcc is not on PATH and CUDA_HOME is unset)"
        return f"not built: this copy of gdrd_fast was never compiled; run `{REBUILD}` ({import_error})"
    if outcome.startswith("built"):
        return f"{outcome}, but it does not import under torch {torch.__version__}: {import_error}; run `{REBUILD}`"
    return outcome


def env_report(as_text: bool = True):
    """A report of the build and the machine: a dict, or its text form when as_text (the default)."""
    cpu_ext = backends.cpu_extension()
    cuda_ext = backends.cuda_extension()
    report = {
        "gdrd_fast": __import__("gdrd_fast").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_extension": "built" if cpu_ext else f"missing ({why_missing('gdrd_fast._C')})",
        "cuda_extension": (f"built (arch {getattr(cuda_ext, 'ARCH_LIST', '?')}, "
                           f"CUDA {getattr(cuda_ext, 'CUDA_VERSION', '?')} vs torch {torch.version.cuda})"
                           if cuda_ext else f"missing ({why_missing('gdrd_fast._C_cuda')})"),
        "triton": backends.triton_version() or "not installed (pip install 'gdrd_fast[triton]')",
        "triton_interpreter": backends.interpreter_mode(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_threads": torch.get_num_threads(),
    }
    if not as_text:
        return report
    width = max(map(len, report))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in report.items())
