"""nn.Module forms of the losses: hyper-parameters and state in `__init__`, tensors in `forward`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional
from . import validation as check
from . import repdistiller_state as repdistiller
from .memory import MemoryBank, MemoryQueue, default_generator
from .params import RelationalParams


class FrozenLogZ:
    """Mixin for Modules whose log-Z buffers are NaN until the first batch estimates them, then frozen.

    Whether they are set is a Python flag: in eager mode the buffers are read (one host sync) only until
    they are set; inside torch.compile nothing is read: an unset flag estimates and keeps a buffer only
    where it is NaN (torch.where), so a compiled step never syncs or breaks the graph.
    """

    log_z_names: tuple[str, ...] = ()

    def _init_log_z(self) -> None:
        for name in self.log_z_names:
            self.register_buffer(name, torch.tensor(float("nan"), dtype=torch.float64))
        self._z_set = False
        self._register_load_state_dict_pre_hook(self._forget_log_z)

    def _forget_log_z(self, *args, **kwargs) -> None:
        self._z_set = False

    def log_z_needed(self) -> bool:
        """True while some log Z may still be NaN (then the caller estimates it)."""
        if not self._z_set and not torch.compiler.is_compiling():
            self._z_set = all(not bool(torch.isnan(getattr(self, n))) for n in self.log_z_names)
        return not self._z_set

    def frozen_log_z(self, estimates: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Each buffer where it is set, else its estimate (what the module will keep once the call succeeds)."""
        return tuple(torch.where(torch.isnan(getattr(self, n)), e.to(torch.float64), getattr(self, n))
                     for n, e in zip(self.log_z_names, estimates))

    def keep_log_z(self, values: tuple[Tensor, ...]) -> None:
        for name, value in zip(self.log_z_names, values):
            getattr(self, name).copy_(value)
        self._z_set = True


def _undoing_draws_on_error(generator: torch.Generator | None, device: torch.device, step, *args):
    """step(*args), with the generator it draws from (or the device's default) restored if it raises: the
    banks and queues a step reads are checked where they are read, after its draws."""
    used = generator if generator is not None else default_generator(device)
    state = used.get_state()
    try:
        return step(*args)
    except BaseException:
        used.set_state(state)
        raise


def _module_finite(module: nn.Module, probe: Tensor, skip: tuple[str, ...] = ()) -> None:
    """NaN policy for a Module's own weights (validation.py): checked like any input. Where value checks are
    off for `probe`'s device (GPU by default, compiled code) nothing is walked."""
    if not check.value_checks(probe):
        return
    for name, p in module.named_parameters():
        check.finite(name, p)
    for name, b in module.named_buffers():
        if b is not None and b.is_floating_point() and not name.startswith(skip) and name not in getattr(
                module, "log_z_names", ()):
            check.finite(name, b)


def _features(name: str, t, batch_name: str, batch: int, width_name: str, width: int, device: torch.device) -> None:
    """f [B, width] (or [B, ...] with `width` features per sample) on the module's device."""
    check.tensor(name, t, tuple(range(2, 9)))
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have {batch_name} = {batch} rows, got shape {tuple(t.shape)}")
    if math.prod(t.shape[1:]) != width:
        raise ValueError(f"{name} must be [B, {width_name}={width}] (or [B, ...] with {width} features per sample), "
                         f"got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the module on {device}: move one of them")


class Embed(nn.Module):
    """Linear then L2-normalise: CRD's embedding head."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(FrozenLogZ, nn.Module):
    """Drop-in for RepDistiller's CRDLoss: forward(f_s, f_t, idx, contrast_idx=None) -> scalar.

    Both banks, both normalisers (NaN until the first batch sets them) and the embeddings live here,
    so state_dict round-trips. Without contrast_idx, K negatives per sample are drawn uniformly from
    all N rows with `self.generator` (None = the global RNG of the device).
    RepDistiller's `CRDLoss(opt)` works too (opt.s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m),
    and load_state_dict accepts a RepDistiller criterion's state (gdrd_fast/repdistiller_state.py).

    forward validates everything first, then draws, computes, and writes the banks and log Z last, so a
    failed call changes nothing. Its steps are hooks that gdrd_fast.distributed.DistributedCRDLoss
    overrides: prepare, batch_sizes, sample_idx, bank_rows, estimate_log_z, loss_scale, update_banks.
    """

    eps = 1e-7  # RepDistiller's NCE eps
    log_z_names = ("log_z_s", "log_z_t")

    def __init__(self, s_dim: int, t_dim: int | None = None, n_data: int | None = None, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5, *,
                 bank_dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        if t_dim is None and n_data is None and not isinstance(s_dim, int):  # RepDistiller's CRDLoss(opt)
            s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m = repdistiller.crd_args_from_opt(s_dim)
        if t_dim is None or n_data is None:
            raise TypeError("CRDLoss needs (s_dim, t_dim, n_data, ...) or RepDistiller's opt object")
        check.all_at_once(
            type(self).__name__, *(lambda n=n, v=v: check.positive_int(n, v) for n, v in dict(
                s_dim=s_dim, t_dim=t_dim, n_data=n_data, feat_dim=feat_dim, nce_k=nce_k).items()),
            lambda: check.positive("nce_t", nce_t), lambda: check.in_unit_interval("nce_m", nce_m),
            lambda: check.float_dtype("bank_dtype", bank_dtype), lambda: functional.check_backend("crd_nce_pair_loss", backend),
            lambda: functional.check_backend("bank_update_pair_", backend))
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.memory_s = self.make_bank(n_data, feat_dim, nce_m, bank_dtype, backend)
        self.memory_t = self.make_bank(n_data, feat_dim, nce_m, bank_dtype, backend)
        self._init_log_z()
        self.s_dim, self.t_dim = s_dim, t_dim
        self.n_data, self.nce_k, self.nce_t = n_data, nce_k, nce_t
        self.backend = backend
        self.generator: torch.Generator | None = None
        self._register_load_state_dict_pre_hook(self._from_repdistiller)

    def _from_repdistiller(self, state_dict, prefix, *args) -> None:
        repdistiller.convert_crd_state(state_dict, prefix, nce_k=self.nce_k, nce_t=self.nce_t,
                                       nce_m=self.memory_s.momentum)

    def make_bank(self, n: int, dim: int, momentum: float, dtype: torch.dtype, backend: str) -> nn.Module:
        """One of the two id-indexed banks (gdrd_fast.distributed.DistributedCRDLoss may shard it)."""
        return MemoryBank(n, dim, momentum, dtype, backend=backend)

    # --- hooks ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Runs once the inputs are valid, before anything is computed."""

    def batch_sizes(self, idx: Tensor) -> list[int]:
        """The batch size of every process: one process here."""
        return [idx.shape[0]]

    def sample_idx(self, idx: Tensor, sizes: list[int] | None = None) -> Tensor:
        """[B, K+1]: idx, then K uniform negatives per sample from `self.generator`."""
        negatives = torch.randint(self.n_data, (idx.shape[0], self.nce_k), generator=self.generator,
                                  device=idx.device, dtype=idx.dtype)
        return torch.cat([idx[:, None], negatives], 1)

    def bank_rows(self, contrast_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(student bank, teacher bank, indices into them)."""
        return self.memory_s.rows, self.memory_t.rows, contrast_idx

    def estimate_log_z(self, v_s: Tensor, v_t: Tensor, bank_s: Tensor, bank_t: Tensor, bank_idx: Tensor,
                       sizes: list[int]) -> tuple[Tensor, Tensor]:
        """RepDistiller's first-batch Z: out_s scores v_s against the teacher bank, out_t v_t against the student's."""
        kw = dict(temperature=self.nce_t, n_data=self.n_data)
        return (functional.crd_log_z(v_s, bank_t, bank_idx, names=self._names_s, **kw),
                functional.crd_log_z(v_t, bank_s, bank_idx, names=self._names_t, **kw))

    def loss_scale(self, sizes: list[int]) -> float:
        """The factor on the summed row losses: the mean over this batch."""
        return 1.0 / sizes[0]

    def update_banks(self, idx: Tensor, v_s: Tensor, v_t: Tensor, sizes: list[int]) -> None:
        """Both banks' momentum update from this batch, in one launch (idx and the embeddings' inputs were
        checked by check_inputs)."""
        functional.run_bank_update_pair_(self.memory_s.rows, v_s, self.memory_t.rows, v_t, idx,
                                         self.memory_s.momentum, self.backend, idx.device)

    # ---------------------------------------------------------------------------------------------------
    _names_s = dict(anchor="embed_s(f_s)", memory="memory_t.rows", idx="contrast_idx", log_z="log_z_s")
    _names_t = dict(anchor="embed_t(f_t)", memory="memory_s.rows", idx="contrast_idx", log_z="log_z_t")

    def check_inputs(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None) -> None:
        device = self.log_z_s.device
        check.tensor("idx", idx, 1, check.INDEX_DTYPES)
        if idx.device != device:
            raise ValueError(f"idx is on {idx.device}, the module on {device}: move one of them")
        _features("f_s", f_s, "idx.shape[0]", idx.shape[0], "s_dim", self.s_dim, device)
        _features("f_t", f_t, "idx.shape[0]", idx.shape[0], "t_dim", self.t_dim, device)
        check.index_in_range("idx", idx, self.n_data)
        if contrast_idx is not None:
            check.tensor("contrast_idx", contrast_idx, 2, check.INDEX_DTYPES)
            if contrast_idx.shape[0] != idx.shape[0] or contrast_idx.shape[1] < 2:
                raise ValueError(f"contrast_idx must be [B, K+1] with B = idx.shape[0] = {idx.shape[0]} and K >= 1, "
                                 f"got shape {tuple(contrast_idx.shape)}")
            if contrast_idx.device != device:
                raise ValueError(f"contrast_idx is on {contrast_idx.device}, the module on {device}")
            check.index_in_range("contrast_idx", contrast_idx, self.n_data)
        check.finite("f_s", f_s)
        check.finite("f_t", f_t)
        _module_finite(self, f_s, skip=("memory_",))  # the banks are checked where they are read
        # an unavailable backend must fail here, before anything is drawn or written
        functional.check_backend("crd_nce_pair_loss", self.backend, device, f_s.dtype)
        functional.check_backend("bank_update_pair_", self.backend, device, self.memory_s.rows.dtype)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        self.check_inputs(f_s, f_t, idx, contrast_idx)
        self.prepare()
        if contrast_idx is None:
            return _undoing_draws_on_error(self.generator, idx.device, self._step, f_s, f_t, idx, None)
        return self._step(f_s, f_t, idx, contrast_idx)

    def _step(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None) -> Tensor:
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        sizes = self.batch_sizes(idx)
        if contrast_idx is None:
            contrast_idx = self.sample_idx(idx, sizes)
        bank_s, bank_t, bank_idx = self.bank_rows(contrast_idx)
        log_z = (self.log_z_s, self.log_z_t)
        if self.log_z_needed():
            log_z = self.frozen_log_z(self.estimate_log_z(v_s, v_t, bank_s, bank_t, bank_idx, sizes))
        # what crd_nce_pair_loss would check and check_inputs did not: the banks and indices as read here
        check.finite(self._names_s["memory"], bank_t)
        check.finite(self._names_t["memory"], bank_s)
        check.index_in_range("contrast_idx", bank_idx, bank_s.shape[0])
        for name, value in zip(self.log_z_names, log_z):
            check.finite(name, value)
        # both sides in one pass over contrast_idx
        loss = functional.run_crd_nce_pair_loss(
            v_s, bank_t.detach(), log_z[0], v_t, bank_s.detach(), log_z[1], bank_idx, temperature=self.nce_t,
            n_data=self.n_data, eps=self.eps, reduction="sum", backend=self.backend,
            device=bank_idx.device) * self.loss_scale(sizes)
        if not self._z_set:
            self.keep_log_z(log_z)
        self.update_banks(idx, v_s.detach(), v_t.detach(), sizes)
        return loss


class InfoNCEBankLoss(nn.Module):
    """InfoNCE against a shared negative bank: forward(query, positive, bank, **options), the options
    (batch_negatives, labels, bank_labels) and normalize as in gdrd_fast.infonce_bank_loss."""

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", backend: str = "auto",
                 normalize: bool = False):
        super().__init__()
        check.all_at_once(type(self).__name__, lambda: check.positive("temperature", temperature),
                          lambda: check.reduction(reduction), lambda: functional.check_backend("infonce_bank_loss", backend))
        self.temperature, self.reduction, self.backend = temperature, reduction, backend
        self.normalize = normalize

    def forward(self, query: Tensor, positive: Tensor | None, bank: Tensor, *,
                batch_negatives: Tensor | None = None, labels: Tensor | None = None,
                bank_labels: Tensor | None = None) -> Tensor:
        return functional.infonce_bank_loss(query, positive, bank, temperature=self.temperature,
                                            reduction=self.reduction, backend=self.backend,
                                            batch_negatives=batch_negatives, normalize=self.normalize,
                                            labels=labels, bank_labels=bank_labels)


class FeatureRegressionLoss(nn.Module):
    """Owns the 1x1-conv adapter (cs -> ct channels): forward(student, teacher) -> MSE."""

    def __init__(self, cs: int, ct: int, bias: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        check.all_at_once(type(self).__name__, lambda: check.positive_int("cs", cs),
                          lambda: check.positive_int("ct", ct), lambda: check.reduction(reduction),
                          lambda: functional.check_backend("feature_regression_loss", backend))
        self.adapter = nn.Conv2d(cs, ct, kernel_size=1, bias=bias)
        self.reduction, self.backend = reduction, backend

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        adapter = self._modules["adapter"]._parameters  # read as params() reads them: a third of the host time
        return functional.feature_regression_loss(student, teacher, adapter["weight"], adapter["bias"],
                                                  reduction=self.reduction, backend=self.backend)


def _input_weight(rel_dim: int, embed_dim: int) -> nn.Parameter:
    return nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rel_dim, embed_dim), a=math.sqrt(5)))  # as nn.Linear


def _input_bias(rel_dim: int, embed_dim: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(rel_dim).uniform_(-1 / math.sqrt(embed_dim), 1 / math.sqrt(embed_dim)))


class TeacherRelation(nn.Module):
    """CRRCD's F_t, the relation of two teacher embeddings:
    F_t(a, b) = weight_out @ relu(weight_in @ a - weight_in @ b + bias_in) + bias_out."""

    def __init__(self, embed_dim: int, rel_dim: int):
        super().__init__()
        self.weight_in, self.bias_in = _input_weight(rel_dim, embed_dim), _input_bias(rel_dim, embed_dim)
        out = nn.Linear(rel_dim, rel_dim)
        self.weight_out, self.bias_out = out.weight, out.bias


class CrossRelation(nn.Module):
    """CRRCD's F_ts, the relation of a teacher embedding a and a student embedding b:
    F_ts(a, b) = weight_out @ relu(weight_teacher @ a - weight_student @ b + bias_in) + bias_out."""

    def __init__(self, embed_dim: int, rel_dim: int):
        super().__init__()
        self.weight_teacher, self.weight_student = _input_weight(rel_dim, embed_dim), _input_weight(rel_dim, embed_dim)
        self.bias_in = _input_bias(rel_dim, embed_dim)
        out = nn.Linear(rel_dim, rel_dim)
        self.weight_out, self.bias_out = out.weight, out.bias


# state_dict keys before the parameters had readable names (checkpoints written then still load)
_OLD_RELATIONAL_KEYS = {
    "ft_w1": "teacher_relation.weight_in", "ft_b1": "teacher_relation.bias_in",
    "ft_w2": "teacher_relation.weight_out", "ft_b2": "teacher_relation.bias_out",
    "fts_u": "cross_relation.weight_teacher", "fts_v": "cross_relation.weight_student",
    "fts_b1": "cross_relation.bias_in", "fts_w2": "cross_relation.weight_out", "fts_b2": "cross_relation.bias_out",
    "h1_w": "teacher_critic.weight", "h1_b": "teacher_critic.bias", "h2_w": "cross_critic.weight",
    "h2_b": "cross_critic.bias"}


def _rename_old_relational_keys(state_dict, prefix, *args, **kwargs) -> None:
    for old, new in _OLD_RELATIONAL_KEYS.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


_RELATIONAL_INPUT_STRUCTURES: dict = {}


class RelationalContrastiveLoss(FrozenLogZ, nn.Module):
    """CRRCD's relational contrastive distillation: forward(e_t, e_s, labels) -> scalar.

    Owns the relation networks F_t (teacher_relation) and F_ts (cross_relation), the critic heads h1
    (teacher_critic) and h2 (cross_critic), the (e_t, e_s, label) queue and both frozen normalisers.
    Returns 0 (with a zero graph) until the queue is full, then freezes Z on the first active step.
    forward validates everything first and pushes both queues last, so a failed call changes nothing.
    """

    log_z_names = ("log_z_t", "log_z_s")

    def __init__(self, embed_dim: int = 512, rel_dim: int = 128, num_negatives: int = 512,
                 queue_size: int = 16384, temperature: float = 0.1, *, n_data: int, supervised: bool = True,
                 backend: str = "auto"):
        super().__init__()
        check.all_at_once(
            type(self).__name__, *(lambda n=n, v=v: check.positive_int(n, v) for n, v in dict(
                embed_dim=embed_dim, rel_dim=rel_dim, num_negatives=num_negatives, queue_size=queue_size,
                n_data=n_data).items()),
            lambda: check.positive("temperature", temperature), lambda: functional.check_backend("relational_contrastive_loss", backend))

        self.teacher_relation = TeacherRelation(embed_dim, rel_dim)  # F_t
        self.cross_relation = CrossRelation(embed_dim, rel_dim)      # F_ts
        self.teacher_critic = nn.Linear(rel_dim, rel_dim)  # h1, on teacher-space relations
        self.cross_critic = nn.Linear(rel_dim, rel_dim)    # h2, on cross-resolution relations
        self._register_load_state_dict_pre_hook(_rename_old_relational_keys)
        # the queues have compiled kernels for 'cpu' and 'cuda' only: any other backend leaves them on 'auto'
        queue_backend = backend if functional.has_backend("queue_push_", backend) else "auto"
        self.queue_t = MemoryQueue(queue_size, embed_dim, with_labels=True, backend=queue_backend)
        self.queue_s = MemoryQueue(queue_size, embed_dim, with_labels=False, backend=queue_backend)
        self._init_log_z()
        self.embed_dim, self.rel_dim = embed_dim, rel_dim
        self.num_negatives, self.temperature, self.n_data = num_negatives, temperature, n_data
        self.supervised, self.backend = supervised, backend
        self.generator: torch.Generator | None = None

    def params(self) -> RelationalParams:
        """The parameters as the functional API takes them (read from the registries: nn.Module's __getattr__
        would cost the host more than the rest of a small step's bookkeeping)."""
        modules = self._modules
        t, x = modules["teacher_relation"]._parameters, modules["cross_relation"]._parameters
        h1, h2 = modules["teacher_critic"]._parameters, modules["cross_critic"]._parameters
        return RelationalParams(
            ft_w1=t["weight_in"], ft_b1=t["bias_in"], ft_w2=t["weight_out"], ft_b2=t["bias_out"],
            fts_u=x["weight_teacher"], fts_v=x["weight_student"], fts_b1=x["bias_in"], fts_w2=x["weight_out"],
            fts_b2=x["bias_out"], h1_w=h1["weight"], h1_b=h1["bias"], h2_w=h2["weight"], h2_b=h2["bias"])

    def check_inputs(self, e_t: Tensor, e_s: Tensor, labels: Tensor, pairs: bool = True) -> None:
        """Every check of forward's arguments; pairs=False for one rank's part of a batch."""
        queue_t = self._modules["queue_t"]
        check.structure_checked(_RELATIONAL_INPUT_STRUCTURES,
                                lambda: self._check_input_structure(e_t, e_s, labels, pairs),
                                e_t, e_s, labels, self._buffers["log_z_t"], queue_t._buffers["values"],
                                extra=(pairs, self.embed_dim, self.backend, queue_t.backend))
        check.finite("e_t", e_t)
        check.finite("e_s", e_s)
        _module_finite(self, e_s, skip=("queue_",))  # the queues are checked where they are read

    def _check_input_structure(self, e_t: Tensor, e_s: Tensor, labels: Tensor, pairs: bool) -> None:
        device = self.log_z_t.device
        check.tensor("e_t", e_t, 2)
        check.tensor("e_s", e_s, 2)
        check.tensor("labels", labels, 1, check.INDEX_DTYPES)
        for name, t in dict(e_t=e_t, e_s=e_s, labels=labels).items():
            if t.device != device:
                raise ValueError(f"{name} is on {t.device}, the module on {device}: move one of them")
        for name, t in dict(e_t=e_t, e_s=e_s).items():
            check.shape(name, t, (labels.shape[0], self.embed_dim), "([B, embed_dim], B = labels.shape[0])")
        if pairs and labels.shape[0] < 2:
            raise ValueError(f"the batch needs at least 2 samples to form pairs (i != j), got {labels.shape[0]}")
        # an unavailable backend must fail here, before anything is drawn or written
        functional.check_backend("relational_contrastive_loss", self.backend, device, e_s.dtype)
        functional.check_backend("queue_push_", self.queue_t.backend, device, self.queue_t.values.dtype)

    def forward(self, e_t: Tensor, e_s: Tensor, labels: Tensor) -> Tensor:
        self.check_inputs(e_t, e_s, labels)
        if self.queue_t.is_full():  # the step draws negatives
            return _undoing_draws_on_error(self.generator, labels.device, self._step, e_t, e_s, labels)
        return self._step(e_t, e_s, labels)

    def _step(self, e_t: Tensor, e_s: Tensor, labels: Tensor) -> Tensor:
        e_t = e_t.detach()
        if not self.queue_t.is_full():
            loss = e_s.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
        else:
            if self.supervised:  # negatives of partner j come from other classes than y_j
                neg_idx = self.queue_t.sample_negatives(labels, self.num_negatives, self.generator)
            else:
                neg_idx = torch.randint(self.queue_t.size, (labels.shape[0], self.num_negatives),
                                        generator=self.generator, device=labels.device)
            args = (e_t, e_s, self.queue_t.values, self.queue_s.values, neg_idx, self.params())
            kw = dict(temperature=self.temperature, n_data=self.n_data, backend=self.backend)
            log_z = (self.log_z_t, self.log_z_s)
            if self.log_z_needed():
                log_z = self.frozen_log_z(functional.relational_log_z(*args, **kw))
            loss = functional.relational_contrastive_loss(*args, log_z_t=log_z[0], log_z_s=log_z[1], **kw)
            if not self._z_set:
                self.keep_log_z(log_z)
        self.queue_t.push_(e_t, labels)
        self.queue_s.push_(e_s.detach())
        return loss
