"""Triton kernels of gdrd_fast, installed as gdrd_fast.kernels (setup.py's package_dir).

Import `triton` only inside these modules: gdrd_fast must import without it.
"""
import importlib as _importlib


def __getattr__(name: str):
    """Kernel modules load on first use (`kernels().infonce`), so `triton` is imported only when needed."""
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return _importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
