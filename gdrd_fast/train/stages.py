"""The training stages: what each one trains, which modes its modules are in, and its loss terms.

A stage maps a batch of Views to named, already weighted loss terms (their sum is the loss). The
networks run under the runtime's autocast; every loss runs in fp32 outside it, so AMP never reaches
the memory banks, the queues or the normalisers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import CRDLoss, FeatureRegressionLoss, RelationalContrastiveLoss
from .runtime import Runtime


class Views(NamedTuple):
    """One batch as both networks see it: the HR face and its LR version (flipped identically)."""
    hr: Tensor
    lr: Tensor
    labels: Tensor
    idx: Tensor


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class Stage(nn.Module):
    """Holds every module whose state a checkpoint must carry; `trainable` lists what the optimizer updates."""
    name = "stage"

    def __init__(self, runtime: Runtime):
        super().__init__()
        self.runtime = runtime

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group name; the Trainer can give a group an optimizer of its own."""
        return {"model": self.trainable_parameters()}

    def losses(self, views: Views) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, views: Views) -> dict[str, Tensor]:
        return self.losses(views)  # DistributedDataParallel syncs gradients of what runs in forward


class GenerativeStage(Stage):
    """Stage 1: || A(S_b(x_lr)) - T_g(x_lr) ||^2 with T_g frozen (docs/method/index.md)."""
    name = "stage1"

    def __init__(self, runtime: Runtime, backbone: nn.Module, teacher: nn.Module,
                 regression: FeatureRegressionLoss, teacher_input: int | None = None):
        super().__init__(runtime)
        self.backbone, self.regression = backbone, regression
        self.teacher = _freeze(teacher)
        self.teacher_input = teacher_input

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def losses(self, views: Views) -> dict[str, Tensor]:
        with self.runtime.autocast():
            student = self.backbone(views.lr)
            with torch.no_grad():
                x_t = views.lr
                if self.teacher_input is not None and x_t.shape[-1] != self.teacher_input:
                    # bicubic overshoots; the teacher was trained on images in [-1, 1]
                    x_t = F.interpolate(x_t, size=self.teacher_input, mode="bicubic",
                                        align_corners=False).clamp_(-1, 1)
                target = self.teacher(x_t)
        if target.shape[-2:] != student.shape[-2:]:
            # [choice] a teacher tap at another resolution is average-pooled onto the student's grid
            target = F.adaptive_avg_pool2d(target.float(), student.shape[-2:])
        return {"gen": self.regression(student.float(), target.float())}


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class DiscriminativeStage(Stage):
    """Stage 2: ArcFace + kd_weight KD + distill_weight (RCD or CRD) on the student's LR embedding.

    With train_backbone=False (GDRD) the backbone is frozen in eval mode (BN statistics too). The same
    stage trains the demo's HR teacher (input='hr', no teacher) and its no-distillation baseline.
    `classifier` and `teacher_classifier` are models.ArcFaceHead: the margin logits feed L_cls, the plain
    s*cos(theta) logits of each network's own head feed L_kd.
    """
    name = "stage2"

    def __init__(self, runtime: Runtime, backbone: nn.Module, head: nn.Module, classifier: nn.Module, *,
                 train_backbone: bool = False, input: str = "lr", teacher: nn.Module | None = None,
                 teacher_classifier: nn.Module | None = None, distill: nn.Module | None = None,
                 kd_weight: float = 0.5, distill_weight: float = 2.0, kd_temperature: float = 4.0):
        super().__init__(runtime)
        if input not in ("lr", "hr"):
            raise ValueError(f"input must be 'lr' or 'hr', got {input!r}")
        if distill is not None and not isinstance(distill, (RelationalContrastiveLoss, CRDLoss)):
            raise TypeError(f"distill must be a RelationalContrastiveLoss or CRDLoss, got {type(distill).__name__}")
        if (distill is not None or kd_weight) and teacher is None:
            raise ValueError("KD and contrastive distillation need a teacher: pass teacher= or set kd_weight=0 "
                             "and distill=None")
        if kd_weight and teacher_classifier is None:
            raise ValueError("kd_weight > 0 needs teacher_classifier (the teacher's ArcFace head)")
        self.backbone, self.head, self.classifier = backbone, head, classifier
        self.train_backbone, self.input = train_backbone, input
        if not train_backbone:
            _freeze(backbone)
        self.teacher = _freeze(teacher) if teacher is not None else None
        self.teacher_classifier = _freeze(teacher_classifier) if teacher_classifier is not None else None
        self.distill = distill
        self.kd_weight, self.distill_weight, self.kd_temperature = kd_weight, distill_weight, kd_temperature

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'distill': the contrastive module's critic / embeddings; 'model': the rest."""
        critic = [p for p in self.distill.parameters() if p.requires_grad] if self.distill is not None else []
        ids = {id(p) for p in critic}
        return {"model": [p for p in self.trainable_parameters() if id(p) not in ids], "distill": critic}

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (None if self.train_backbone else self.backbone, self.teacher, self.teacher_classifier):
            if frozen is not None:
                frozen.eval()
        return self

    def losses(self, views: Views) -> dict[str, Tensor]:
        x = views.lr if self.input == "lr" else views.hr
        with self.runtime.autocast():
            with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
                features = self.backbone(x)
            embedding = self.head(features)
            teacher_embedding = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_embedding = self.teacher(views.hr)
        embedding = embedding.float()
        logits = self.classifier(embedding, views.labels)
        terms = {"cls": F.cross_entropy(logits.margin, views.labels)}
        if self.kd_weight:
            with torch.no_grad():
                teacher_logits = self.teacher_classifier.s * self.teacher_classifier.cosine(teacher_embedding)
            terms["kd"] = self.kd_weight * kd_loss(logits.plain, teacher_logits, self.kd_temperature)
        if isinstance(self.distill, RelationalContrastiveLoss):
            terms["rcd"] = self.distill_weight * self.distill(
                F.normalize(teacher_embedding.float(), dim=1), F.normalize(embedding, dim=1), views.labels)
        elif isinstance(self.distill, CRDLoss):
            terms["crd"] = self.distill_weight * self.distill(embedding, teacher_embedding.float(), views.idx)
        return terms
