"""What this install can run: compiled extensions, Triton, devices (`python -m gdrd_fast env`)."""
from __future__ import annotations

import platform

import torch

from . import backends


def env_report(as_text: bool = True):
    """A report of the build and the machine: a dict, or its text form when as_text (the default)."""
    cpu_ext = backends.cpu_extension()
    cuda_ext = backends.cuda_extension()
    report = {
        "gdrd_fast": __import__("gdrd_fast").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_extension": "built" if cpu_ext else f"missing ({backends.extension_error('gdrd_fast._C')})",
        "cuda_extension": (f"built (arch {getattr(cuda_ext, 'ARCH_LIST', '?')}, "
                           f"CUDA {getattr(cuda_ext, 'CUDA_VERSION', '?')} vs torch {torch.version.cuda})"
                           if cuda_ext else
                           f"missing ({backends.extension_error('gdrd_fast._C_cuda') or 'needs the CPU extension'})"),
        "triton": backends.triton_version() or "not installed",
        "triton_interpreter": backends.interpreter_mode(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_threads": torch.get_num_threads(),
    }
    if not as_text:
        return report
    width = max(map(len, report))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in report.items())
