"""gdrd_fast's losses as torchdistill mid-level losses: import this module, then use the keys in YAML.

    import gdrd_fast.integrations.torchdistill  # registers the four keys below

| key                                     | gdrd_fast loss                          | torchdistill peer / arguments |
|-----------------------------------------|-----------------------------------------|-------------------------------|
| `gdrd_fast.CRDLoss`                     | CRD over two id-indexed banks           | `CRDLoss`, same kwargs        |
| `gdrd_fast.InfoNCEBankLoss`             | student query vs teacher key + a queue  | KDLoss-style module paths     |
| `gdrd_fast.RelationalContrastiveLoss`   | CRRCD (owns its relation networks)      | module paths + CRD-style sizes|
| `gdrd_fast.FeatureRegressionLoss`       | 1x1-conv adapter + MSE (owns adapter)   | module paths + channels       |

Forward signature is torchdistill's: forward(student_io_dict, teacher_io_dict, targets). The CRD key
takes the embeddings from torchdistill's `Linear4CRD` wrappers (their `normalizer` output), which
torchdistill trains, and `pos_idx` / `contrast_idx` from `CRDDatasetWrapper`'s supp_dict, exactly as
torchdistill's own CRDLoss. Two losses own trainable parameters; torchdistill builds its optimizer from
the models only, so call `train_loss_parameters(box)` once after building the DistillationBox.
Losses move themselves to their inputs' device on first use (torchdistill does not move criteria).
"""
from __future__ import annotations

import itertools

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as error:  # the module is optional; gdrd_fast never imports it itself
    raise ImportError("gdrd_fast.integrations.torchdistill needs torchdistill: pip install torchdistill") from error

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from ..losses import CRDLoss, FeatureRegressionLoss, RelationalContrastiveLoss
from ..memory import MemoryBank, MemoryQueue

__all__ = [
    "TorchdistillCRDLoss",
    "TorchdistillFeatureRegressionLoss",
    "TorchdistillInfoNCEBankLoss",
    "TorchdistillRelationalContrastiveLoss",
    "loss_parameters",
    "train_loss_parameters",
]


class _IOLoss(nn.Module):
    """Reads the student's and teacher's tensors from torchdistill's io dicts (KDLoss's argument names)."""

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str):
        super().__init__()
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io

    def student_teacher(self, student_io_dict: dict, teacher_io_dict: dict) -> tuple[Tensor, Tensor]:
        student = student_io_dict[self.student_module_path][self.student_module_io]
        teacher = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        _follow(self, student.device)
        return student, teacher


def _follow(module: nn.Module, device: torch.device) -> None:
    state = next(itertools.chain(module.buffers(), module.parameters()), None)
    if state is not None and state.device != device:
        module.to(device)


@register_mid_level_loss(key="gdrd_fast.CRDLoss")
class TorchdistillCRDLoss(nn.Module):
    """torchdistill's CRDLoss arguments, gdrd_fast's fused CRD. State: crd.memory_s/t.rows, crd.log_z_s/t.
    Draws from the global generator exactly what torchdistill's CRDLoss draws, in its order."""

    def __init__(self, student_norm_module_path: str, student_empty_module_path: str, teacher_norm_module_path: str,
                 input_size: int, output_size: int, num_negative_samples: int, num_samples: int,
                 temperature: float = 0.07, momentum: float = 0.5, eps: float = 1e-7, backend: str = "auto"):
        super().__init__()
        if output_size != num_samples:
            raise ValueError(f"output_size ({output_size}, the bank rows) must equal num_samples ({num_samples}): "
                             "gdrd_fast's CRD uses one dataset size for both")
        self.student_norm_module_path = student_norm_module_path
        self.student_empty_module_path = student_empty_module_path
        self.teacher_norm_module_path = teacher_norm_module_path
        with torch.random.fork_rng(devices=[]):  # its embeddings are dropped below: their draws must not count
            self.crd = CRDLoss(input_size, input_size, num_samples, feat_dim=input_size,
                               nce_k=num_negative_samples, nce_t=temperature, nce_m=momentum, backend=backend)
        # Linear4CRD's normalizers embed (and torchdistill trains them): the banks take their outputs as they are
        self.crd.embed_s, self.crd.embed_t = nn.Identity(), nn.Identity()
        # the banks drawn as torchdistill's CRDLoss draws them, from the global generator: memory_v1 (the
        # student's) first, then memory_v2, each uniform(-a, a), so that a run with the same seed starts from
        # the same banks and leaves the generator where torchdistill's does (same data order after it)
        self.crd.memory_s = MemoryBank(num_samples, input_size, momentum, backend=backend)
        self.crd.memory_t = MemoryBank(num_samples, input_size, momentum, backend=backend)
        self.crd.eps = eps

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        v_t = teacher_io_dict[self.teacher_norm_module_path]["output"]
        v_s = student_io_dict[self.student_norm_module_path]["output"]
        supp = student_io_dict[self.student_empty_module_path]["input"]
        _follow(self, v_s.device)
        contrast_idx = supp.get("contrast_idx")
        return self.crd(v_s, v_t, torch.as_tensor(supp["pos_idx"], device=v_s.device),
                        None if contrast_idx is None else torch.as_tensor(contrast_idx, device=v_s.device))


@register_mid_level_loss(key="gdrd_fast.InfoNCEBankLoss")
class TorchdistillInfoNCEBankLoss(_IOLoss):
    """MoCo-style InfoNCE: the student's (flattened) output is the query, the teacher's the positive, and
    a queue of earlier teacher outputs (queue_size rows of input_size) the negatives; the queue starts empty."""

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, input_size: int, queue_size: int = 16384, temperature: float = 0.07,
                 normalize: bool = True, backend: str = "auto"):
        super().__init__(student_module_path, student_module_io, teacher_module_path, teacher_module_io)
        self.queue = MemoryQueue(queue_size, input_size)
        self.temperature, self.normalize, self.backend = temperature, normalize, backend

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        student, teacher = self.student_teacher(student_io_dict, teacher_io_dict)
        query, key = student.flatten(1), teacher.flatten(1).detach()
        loss = functional.infonce_bank_loss(query, key, self.queue.filled(), temperature=self.temperature,
                                            normalize=self.normalize, backend=self.backend)
        self.queue.push_(F.normalize(key, dim=1) if self.normalize else key)
        return loss


@register_mid_level_loss(key="gdrd_fast.RelationalContrastiveLoss")
class TorchdistillRelationalContrastiveLoss(_IOLoss):
    """CRRCD between the teacher's and the student's embeddings (input_size wide), labels = targets.
    0 until its queue holds queue_size rows; owns its relation networks (see train_loss_parameters)."""

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, input_size: int, num_samples: int, output_size: int = 128,
                 num_negative_samples: int = 512, queue_size: int = 16384, temperature: float = 0.1,
                 supervised: bool = True, backend: str = "auto"):
        super().__init__(student_module_path, student_module_io, teacher_module_path, teacher_module_io)
        self.loss = RelationalContrastiveLoss(input_size, output_size, num_negative_samples, queue_size, temperature,
                                              n_data=num_samples, supervised=supervised, backend=backend)

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor, *args, **kwargs) -> Tensor:
        student, teacher = self.student_teacher(student_io_dict, teacher_io_dict)
        return self.loss(teacher.flatten(1).detach(), student.flatten(1), torch.as_tensor(targets, device=student.device))


@register_mid_level_loss(key="gdrd_fast.FeatureRegressionLoss")
class TorchdistillFeatureRegressionLoss(_IOLoss):
    """FitNets-style regression of the teacher's feature map by a 1x1 conv of the student's (fused, never
    materialising the projected map); owns the adapter (see train_loss_parameters)."""

    def __init__(self, student_module_path: str, student_module_io: str, teacher_module_path: str,
                 teacher_module_io: str, in_channels: int, out_channels: int, bias: bool = True,
                 backend: str = "auto"):
        super().__init__(student_module_path, student_module_io, teacher_module_path, teacher_module_io)
        self.loss = FeatureRegressionLoss(in_channels, out_channels, bias=bias, backend=backend)

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        student, teacher = self.student_teacher(student_io_dict, teacher_io_dict)
        return self.loss(student, teacher.detach())


def loss_parameters(criterion: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of a torchdistill criterion's terms (WeightedSumLoss keeps them in a plain
    dict, so criterion.parameters() misses them)."""
    terms = getattr(criterion, "term_dict", None)
    modules = [term for term, _ in terms.values()] if terms is not None else [criterion]
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def train_loss_parameters(box, **group_options) -> int:
    """Add the criterion's own parameters (relation networks, adapters) to box.optimizer as one param group
    (group_options, e.g. lr, override the optimizer's defaults); returns how many were added."""
    have = {id(p) for group in box.optimizer.param_groups for p in group["params"]}
    new = [p for p in loss_parameters(box.criterion) if id(p) not in have]
    if new:
        box.optimizer.add_param_group({"params": new, **group_options})
    return len(new)
