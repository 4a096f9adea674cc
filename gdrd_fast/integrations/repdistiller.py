"""RepDistiller compatibility: kept at its old path; the code lives in gdrd_fast/repdistiller_state.py,
below the Modules that use it (gdrd_fast.CRDLoss)."""
from ..repdistiller_state import OPT_FIELDS, convert_crd_state, crd_args_from_opt  # noqa: F401
