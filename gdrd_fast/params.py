"""Parameter containers of the ops that take parameters as plain tensors (the functional API)."""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class RelationalParams(NamedTuple):
    """Parameters of CRRCD's two relation networks and two critic heads.

    F_t(a, b)  = ft_w2 @ relu(ft_w1 @ a - ft_w1 @ b + ft_b1) + ft_b2     teacher-space relation
    F_ts(a, b) = fts_w2 @ relu(fts_u @ a - fts_v @ b + fts_b1) + fts_b2  cross-resolution relation
    h1(x) = normalize(h1_w @ x + h1_b), h2(x) = normalize(h2_w @ x + h2_b)  critic heads of F_t, F_ts
    Shapes for embeddings of size e and relations of size d: relational_param_shapes(e, d).
    """
    ft_w1: Tensor
    ft_b1: Tensor
    ft_w2: Tensor
    ft_b2: Tensor
    fts_u: Tensor
    fts_v: Tensor
    fts_b1: Tensor
    fts_w2: Tensor
    fts_b2: Tensor
    h1_w: Tensor
    h1_b: Tensor
    h2_w: Tensor
    h2_b: Tensor


def relational_param_shapes(embed_dim: int, rel_dim: int) -> dict[str, tuple[int, ...]]:
    """The shape of every RelationalParams field for embeddings of embed_dim and relations of rel_dim."""
    e, d = embed_dim, rel_dim
    return dict(ft_w1=(d, e), ft_b1=(d,), ft_w2=(d, d), ft_b2=(d,), fts_u=(d, e), fts_v=(d, e), fts_b1=(d,),
                fts_w2=(d, d), fts_b2=(d,), h1_w=(d, d), h1_b=(d,), h2_w=(d, d), h2_b=(d,))
