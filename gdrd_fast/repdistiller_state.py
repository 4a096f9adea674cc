"""RepDistiller compatibility for gdrd_fast.CRDLoss: its `opt` constructor and its criterion's state.

RepDistiller's criterion (crd/criterion.py, crd/memory.py) keeps the student bank as
`contrast.memory_v1`, the teacher bank as `contrast.memory_v2`, and `contrast.params` =
[K, T, Z_v1, Z_v2, momentum] with Z = -1 until the first batch sets it. Z_v1 normalises the student
anchor's scores against the teacher bank (gdrd_fast's log_z_s = log Z_v1), Z_v2 the teacher's
(log_z_t = log Z_v2). The embeddings (`embed_s.linear`, `embed_t.linear`) have the same keys here.
"""
from __future__ import annotations

import math

import torch

OPT_FIELDS = ("s_dim", "t_dim", "n_data", "feat_dim", "nce_k", "nce_t", "nce_m")
_CONTRAST = ("params", "memory_v1", "memory_v2")


def crd_args_from_opt(opt) -> tuple:
    """(s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m) read from RepDistiller's options object."""
    missing = [name for name in OPT_FIELDS if not hasattr(opt, name)]
    if missing:
        raise TypeError(f"CRDLoss(opt): opt has no {', '.join(missing)}; expected RepDistiller's options "
                        f"({', '.join(OPT_FIELDS)}) or CRDLoss(s_dim, t_dim, n_data, ...)")
    return tuple(getattr(opt, name) for name in OPT_FIELDS)


def _log_z(z: float) -> float:
    return math.log(z) if z > 0 else math.nan  # RepDistiller's -1 means "not set yet", gdrd_fast's NaN


def convert_crd_state(state: dict, prefix: str, *, nce_k: int, nce_t: float, nce_m: float) -> None:
    """Rewrite, in place, a RepDistiller CRDLoss state found under `prefix` into gdrd_fast's keys.

    A state without RepDistiller's keys is left alone. K, T and the momentum recorded in params must be
    this module's (a different opt would give a different loss), else ValueError.
    """
    keys = {name: f"{prefix}contrast.{name}" for name in _CONTRAST}
    present = [k for k in keys.values() if k in state]
    if not present:
        return
    if len(present) != len(keys):
        raise KeyError(f"a RepDistiller CRD state needs {sorted(keys.values())}; found only {present}")
    params = state[keys["params"]]
    if params.numel() != 5:
        raise ValueError(f"{keys['params']} must hold [K, T, Z_v1, Z_v2, momentum], got shape {tuple(params.shape)}")
    k, t, z_v1, z_v2, m = params.tolist()
    # params is float32 in RepDistiller: T and the momentum come back rounded to float32
    for name, theirs, ours in (("nce_k", k, nce_k), ("nce_t", t, nce_t), ("nce_m", m, nce_m)):
        if not math.isclose(theirs, ours, rel_tol=1e-6):
            raise ValueError(f"the RepDistiller state has {name}={theirs:g} but this CRDLoss has {name}={ours:g}: "
                             "build it from the same opt")
    del state[keys["params"]]
    state[f"{prefix}memory_s.rows"] = state.pop(keys["memory_v1"])
    state[f"{prefix}memory_t.rows"] = state.pop(keys["memory_v2"])
    state[f"{prefix}log_z_s"] = torch.tensor(_log_z(z_v1), dtype=torch.float64)
    state[f"{prefix}log_z_t"] = torch.tensor(_log_z(z_v2), dtype=torch.float64)
