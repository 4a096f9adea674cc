"""gdrd_fast: fused kernels for knowledge distillation and the GDRD method for low-resolution faces.

The public names load on first use (PEP 562), so that `gdrd-fast` answers before torch is imported;
`import gdrd_fast.functional` (or any of these names) registers the custom ops.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static readers (type checkers, the API docs) see; at run time __getattr__ loads them
    from .env import env_report  # noqa: F401
    from .functional import (crd_log_z, crd_nce_loss, feature_regression_loss, infonce_bank_loss,  # noqa: F401
                             relational_contrastive_loss, relational_log_z)
    from .losses import CRDLoss, FeatureRegressionLoss, InfoNCEBankLoss, RelationalContrastiveLoss  # noqa: F401
    from .memory import MemoryBank, MemoryQueue  # noqa: F401
    from .params import RelationalParams  # noqa: F401
    from .validation import set_checks  # noqa: F401

__version__ = "0.1.0"
# public name -> the module that defines it
_EXPORTS = {"crd_nce_loss": "functional", "crd_log_z": "functional", "infonce_bank_loss": "functional",
            "relational_contrastive_loss": "functional", "relational_log_z": "functional",
            "feature_regression_loss": "functional", "CRDLoss": "losses", "InfoNCEBankLoss": "losses",
            "FeatureRegressionLoss": "losses", "RelationalContrastiveLoss": "losses", "MemoryBank": "memory",
            "MemoryQueue": "memory", "RelationalParams": "params", "set_checks": "validation",
            "env_report": "env"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule not imported yet (gdrd_fast.models, ...)
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
