"""ArcFace margin head (additive angular margin, as insightface arcface_torch)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import value_checks

IGNORE = -1  # insightface's label for rows whose class is not in this classifier (no margin, no loss)


class ArcFaceLogits(NamedTuple):
    margin: Tensor  # s * cos(theta + m) at the label, s * cos(theta) elsewhere: the L_cls logits
    plain: Tensor   # s * cos(theta) everywhere, no margin: the logits L_kd compares (docs/method/index.md)


class ArcFaceHead(nn.Module):
    """A normalised classifier W [num_classes, embedding_dim] with ArcFace's margin on the target logit.

    cos(theta + m) is used while theta + m <= pi; past it (cos theta < cos(pi - m)) the target logit
    becomes cos(theta) - m sin(m), which keeps it decreasing in theta. With easy_margin the margin
    applies only where cos(theta) > 0.
    """

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False):
        super().__init__()
        if embedding_dim <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_dim and num_classes must be positive, got {embedding_dim}, {num_classes}")
        if s <= 0 or not 0 <= m < math.pi / 2:
            raise ValueError(f"need s > 0 and 0 <= m < pi/2, got s={s}, m={m}")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim).normal_(0, 0.01))

    def cosine(self, embeddings: Tensor) -> Tensor:
        # fp32 at least, autocast or not: the margin math needs accurate angles near cos = +-1
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        with torch.autocast(embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.to(dtype), dim=1), F.normalize(self.weight.to(dtype), dim=1))

    def forward(self, embeddings: Tensor, labels: Tensor) -> ArcFaceLogits:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(f"embeddings must be (B, {self.weight.shape[1]}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1] or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be an integer tensor of shape ({embeddings.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        if value_checks(labels) and bool(((labels < IGNORE) | (labels >= self.weight.shape[0])).any()):
            raise ValueError(f"labels must lie in [0, {self.weight.shape[0]}) or be {IGNORE} (ignored)")
        cos = self.cosine(embeddings)
        rows = (labels != IGNORE).nonzero().squeeze(1)
        target = cos[rows, labels[rows]]
        sin = (1 - target * target).clamp_min(1e-12).sqrt()
        with_margin = target * math.cos(self.m) - sin * math.sin(self.m)
        if self.easy_margin:
            with_margin = torch.where(target > 0, with_margin, target)
        else:
            with_margin = torch.where(target > math.cos(math.pi - self.m), with_margin,
                                      target - math.sin(math.pi - self.m) * self.m)
        margin = cos.index_put((rows, labels[rows]), with_margin)
        return ArcFaceLogits(self.s * margin, self.s * cos)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """L_cls: cross-entropy of the margin logits, rows labelled -1 left out (NaN if all are)."""
        return F.cross_entropy(self.forward(embeddings, labels).margin, labels.long(), ignore_index=IGNORE)
