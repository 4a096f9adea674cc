"""Identification protocols (docs/method/evaluation.md): CMC with cosine scores, the UCCS-style linear probe,
and AR-style reports per subset (occlusion, illumination, ...)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RANKS = (1, 5, 10, 20)


def _features_labels(name: str, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"{name}_features must be a non-empty (N, dim) tensor, got "
                         f"{getattr(features, 'shape', type(features))}")
    if not isinstance(labels, Tensor) or labels.shape != features.shape[:1] or labels.is_floating_point():
        raise ValueError(f"{name}_labels must be an integer tensor of shape ({features.shape[0]},), got "
                         f"{getattr(labels, 'shape', type(labels))}")
    return features.double(), labels.long()


def cmc(gallery_features: Tensor, gallery_labels: Tensor, probe_features: Tensor, probe_labels: Tensor,
        ranks: Sequence[int] = RANKS) -> dict[int, float]:
    """Closed-set CMC: rank-k = fraction of probes whose first correct gallery image is among the k
    highest cosine scores. Ties count against the probe (a wrong image scoring equal to the best correct
    one ranks ahead of it), so constant features cannot score well. Every probe identity must be in the
    gallery; gallery-only identities act as distractors."""
    g, gl = _features_labels("gallery", gallery_features, gallery_labels)
    p, pl = _features_labels("probe", probe_features, probe_labels)
    if g.shape[1] != p.shape[1]:
        raise ValueError(f"gallery dim {g.shape[1]} != probe dim {p.shape[1]}")
    missing = set(pl.tolist()) - set(gl.tolist())
    if missing:
        raise ValueError(f"probe_labels has identities absent from the gallery: {sorted(missing)[:5]}")
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be positive ints, got {ranks!r}")
    p, g = F.normalize(p, dim=1), F.normalize(g, dim=1)
    ranks_of_hits = []
    # probes in chunks: TinyFace's full gallery (150k+ distractors) would need GBs of scores at once
    chunk = max(1, (1 << 24) // max(1, g.shape[0]))
    for s in range(0, p.shape[0], chunk):
        scores = p[s:s + chunk] @ g.T                                      # (probes, gallery)
        correct = pl[s:s + chunk, None] == gl[None, :]
        best_correct = scores.masked_fill(~correct, -torch.inf).max(1).values
        ranks_of_hits.append(1 + ((scores >= best_correct[:, None]) & ~correct).sum(1))  # 1-based
    rank = torch.cat(ranks_of_hits)
    return {int(k): float((rank <= k).double().mean()) for k in ranks}


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 weight_decay: float = 1e-4, max_iter: int = 100) -> float:
    """UCCS-style protocol: frozen features, a linear softmax classifier fitted on the train split
    (L-BFGS from zeros on a convex loss, so the result is deterministic), top-1 accuracy on the test
    split. Test identities never seen in training count as errors."""
    xtr, ytr = _features_labels("train", train_features, train_labels)
    xte, yte = _features_labels("test", test_features, test_labels)
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train dim {xtr.shape[1]} != test dim {xte.shape[1]}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    classes, ytr_index = ytr.unique(return_inverse=True)
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    weight = torch.zeros(xtr.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    # Features are unit vectors: a fixed logit scale lets the softmax become confident quickly.
    scale = 16.0
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * xtr @ weight + bias, ytr_index) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = classes[(scale * xte @ weight + bias).argmax(1)]
    return float((predicted == yte).double().mean())


def subset_report(gallery_features: Tensor, gallery_labels: Tensor,
                  subsets: Mapping[str, tuple[Tensor, Tensor]], ranks: Sequence[int] = RANKS) -> dict[str, dict]:
    """AR-style report: one CMC per named probe subset against a common gallery, plus the probe count."""
    if not subsets:
        raise ValueError("subsets must name at least one (probe_features, probe_labels) pair")
    return {name: {"probes": int(features.shape[0]),
                   "cmc": cmc(gallery_features, gallery_labels, features, labels, ranks)}
            for name, (features, labels) in subsets.items()}
