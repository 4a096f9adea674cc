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
    """One batch as both networks see it: the HR face and its LR version (flipped identically), and, when
    the run reads a teacher cache (train/teacher_cache.py), the frozen teachers' outputs for that flip."""
    hr: Tensor
    lr: Tensor
    labels: Tensor
    idx: Tensor
    teacher_tap: Tensor | None = None  # T_g's feature of lr, before pooling onto the student's grid
    teacher_embedding: Tensor | None = None  # T_d's embedding of hr


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

    def teachers_channels_last(self) -> None:
        """Run the frozen teachers in NHWC, the layout GPU tensor cores convolve fastest (Trainer: on CUDA)."""
        for module in self.modules():
            if isinstance(module, GenerativeTarget):
                module.memory_format = torch.channels_last
                module.teacher.to(memory_format=torch.channels_last)

    def forward(self, views: Views) -> dict[str, Tensor]:
        return self.losses(views)  # DistributedDataParallel syncs gradients of what runs in forward


class GenerativeTarget(nn.Module):
    """T_g's feature for the LR face: resized to the teacher's input size, optionally noised, at a timestep.

    noise: std of Gaussian noise mixed in variance-preserving form, x_t = sqrt(1 - noise^2) x + noise eps
    (DDPM's timestep t pairs with noise = sqrt(1 - alpha_bar_t)); 0 is the paper's clean input [choice].
    The target is average-pooled onto the student's grid when the tap's grid differs.
    """

    def __init__(self, teacher: nn.Module, input_size: int | None = None, timestep: int = 0, noise: float = 0.0):
        super().__init__()
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        if isinstance(timestep, bool) or not isinstance(timestep, int) or timestep < 0:
            raise ValueError(f"timestep must be a non-negative int, got {timestep!r}")
        self.teacher = _freeze(teacher)
        self.input_size, self.timestep, self.noise = input_size, timestep, noise
        self.memory_format = torch.contiguous_format  # Stage.teachers_channels_last sets NHWC

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def features(self, lr: Tensor) -> Tensor:
        """The teacher's tap of the LR face, in float32 (what a teacher cache stores)."""
        x = lr
        if self.input_size is not None and x.shape[-1] != self.input_size:
            # bicubic overshoots; the teacher was trained on images in [-1, 1]
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False).clamp_(-1, 1)
        if self.noise:
            x = (1 - self.noise ** 2) ** 0.5 * x + self.noise * torch.randn_like(x)
        x = x.contiguous(memory_format=self.memory_format)
        # t = 0 calls teacher(x): any feature extractor works as a teacher at the paper's setting
        return (self.teacher(x, self.timestep) if self.timestep else self.teacher(x)).float()

    @torch.no_grad()
    def forward(self, lr: Tensor, grid: tuple[int, int], cached: Tensor | None = None) -> Tensor:
        """The target on the student's grid; `cached`: features(lr) read from a teacher cache."""
        target = self.features(lr) if cached is None else cached.float()
        if target.shape[-2:] != tuple(grid):
            # [choice] a teacher tap at another resolution is average-pooled onto the student's grid
            target = F.adaptive_avg_pool2d(target.float(), grid)
        return target.float()


class GenerativeStage(Stage):
    """Stage 1: || A(S_b(x_lr)) - T_g(x_lr) ||^2 with T_g frozen (docs/method/index.md)."""
    name = "stage1"

    def __init__(self, runtime: Runtime, backbone: nn.Module, teacher: nn.Module,
                 regression: FeatureRegressionLoss, teacher_input: int | None = None, timestep: int = 0,
                 noise: float = 0.0):
        super().__init__(runtime)
        self.backbone, self.regression = backbone, regression
        self.target = GenerativeTarget(teacher, teacher_input, timestep, noise)

    @property
    def teacher(self) -> nn.Module:
        return self.target.teacher

    def losses(self, views: Views) -> dict[str, Tensor]:
        with self.runtime.autocast():
            student = self.backbone(views.lr)
            target = self.target(views.lr, student.shape[-2:], views.teacher_tap)
        return {"gen": self.regression(student.float(), target)}


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class DiscriminativeStage(Stage):
    """Stage 2: ArcFace + kd_weight KD + distill_weight (RCD or CRD) on the student's LR embedding.

    With train_backbone=False (GDRD) the backbone is frozen in eval mode (BN statistics too). The same
    stage trains the demo's HR teacher (input='hr', no teacher) and its no-distillation baseline.
    `classifier` and `teacher_classifier` are models.ArcFaceHead: the margin logits feed L_cls, the plain
    s*cos(theta) logits of each network's own head feed L_kd. With `generative` (a GenerativeTarget) and
    `regression`, the stage-1 term gen_weight * L_gen is added on the same backbone features: end-to-end
    GDRD (variant gdrd-e2e).
    """
    name = "stage2"

    def __init__(self, runtime: Runtime, backbone: nn.Module, head: nn.Module, classifier: nn.Module, *,
                 train_backbone: bool = False, input: str = "lr", teacher: nn.Module | None = None,
                 teacher_classifier: nn.Module | None = None, distill: nn.Module | None = None,
                 kd_weight: float = 0.5, distill_weight: float = 2.0, kd_temperature: float = 4.0,
                 generative: GenerativeTarget | None = None, regression: FeatureRegressionLoss | None = None,
                 gen_weight: float = 1.0):
        super().__init__(runtime)
        if (generative is None) != (regression is None):
            raise ValueError("the end-to-end generative term needs both generative= and regression=")
        if generative is not None and not train_backbone:
            raise ValueError("the generative term trains the backbone: it needs train_backbone=True")
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
        self.generative, self.regression, self.gen_weight = generative, regression, gen_weight
        self.teacher_memory_format = torch.contiguous_format
        self.kd_weight, self.distill_weight, self.kd_temperature = kd_weight, distill_weight, kd_temperature

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'distill': the contrastive module's critic / embeddings; 'backbone': S_b when it trains; 'model': the rest."""
        critic = [p for p in self.distill.parameters() if p.requires_grad] if self.distill is not None else []
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in critic + backbone}
        return {"model": [p for p in self.trainable_parameters() if id(p) not in ids], "distill": critic,
                "backbone": backbone}

    def teachers_channels_last(self) -> None:
        super().teachers_channels_last()
        if self.teacher is not None:
            self.teacher_memory_format = torch.channels_last
            self.teacher.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (None if self.train_backbone else self.backbone, self.teacher, self.teacher_classifier,
                       self.generative):
            if frozen is not None:
                frozen.eval()
        return self

    def losses(self, views: Views) -> dict[str, Tensor]:
        x = views.lr if self.input == "lr" else views.hr
        with self.runtime.autocast():
            with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
                features = self.backbone(x)
            embedding = self.head(features)
            teacher_embedding = views.teacher_embedding
            if self.teacher is not None and teacher_embedding is None:
                with torch.no_grad():
                    teacher_embedding = self.teacher(views.hr.contiguous(memory_format=self.teacher_memory_format))
            target = (self.generative(views.lr, features.shape[-2:], views.teacher_tap)
                      if self.generative is not None else None)
        embedding = embedding.float()
        logits = self.classifier(embedding, views.labels)
        terms = {"cls": F.cross_entropy(logits.margin, views.labels)}
        if target is not None:
            terms["gen"] = self.gen_weight * self.regression(features.float(), target)
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
