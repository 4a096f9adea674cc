"""Trainer: stages, deterministic resume, checkpoints, frozen backbone, AMP (tiny CPU models)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdrd_fast import CRDLoss, FeatureRegressionLoss, RelationalContrastiveLoss
from gdrd_fast.models import ArcFaceHead
from gdrd_fast.train import (DiscriminativeStage, GenerativeStage, OptimConfig, Runtime, Trainer, Views, kd_loss,
                             load_checkpoint, seed_everything)
from gdrd_fast.train.config import OptimizerConfig
from train_cases import CLASSES, EMB, N_DATA, Faces


def backbone():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))


def head():
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, EMB), nn.BatchNorm1d(EMB))


CRITIC_ADAMW = OptimizerConfig(optimizer="adamw", lr=1e-3, weight_decay=0.0)


def build(kind: str, amp: str = "none", distill_optim: OptimizerConfig | None = None):
    """A fresh stage of `kind`; fresh random init, so a resumed trainer must overwrite all of it."""
    runtime = Runtime.create("cpu", amp)
    if kind == "stage1":
        teacher = nn.Conv2d(3, 6, 4, 4)  # 12x12 input (teacher_input) -> 3x3 tap, pooled onto 4x4
        stage = GenerativeStage(runtime, backbone(), teacher, FeatureRegressionLoss(8, 6), teacher_input=12)
    else:
        if kind == "rcd":
            distill = RelationalContrastiveLoss(EMB, 8, num_negatives=5, queue_size=8, n_data=N_DATA)
        elif kind == "crd":
            distill = CRDLoss(EMB, EMB, N_DATA, feat_dim=8, nce_k=7)
        else:
            distill = None
        teacher = nn.Sequential(backbone(), head())
        stage = DiscriminativeStage(runtime, backbone(), head(), ArcFaceHead(EMB, CLASSES, s=8.0, m=0.3),
                                    train_backbone=kind == "baseline", teacher=teacher,
                                    teacher_classifier=ArcFaceHead(EMB, CLASSES, s=8.0, m=0.3), distill=distill,
                                    kd_weight=0.5, distill_weight=2.0)
    optim = OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=6)
    return Trainer(stage, Faces(), runtime, optim, batch_size=4, seed=3, resolution=4, progress=False,
                   group_optims={"distill": distill_optim})


def snapshot(trainer):
    state = {f"stage.{k}": v.clone() for k, v in trainer.stage.state_dict().items()}
    for o, optimizer in enumerate(trainer.optimizers):
        for i, s in optimizer.state_dict()["state"].items():
            state.update({f"optimizer{o}.{i}.{name}": v.clone() for name, v in s.items()})
    return state


@pytest.mark.parametrize("kind, distill_optim", [("stage1", None), ("rcd", None), ("crd", None), ("baseline", None),
                                                 ("rcd", CRITIC_ADAMW), ("crd", CRITIC_ADAMW)])
def test_resume_gives_identical_weights(kind, distill_optim, tmp_path):
    seed_everything(7)
    straight = build(kind, distill_optim=distill_optim)
    initial = snapshot(straight)
    straight.train_steps(6)  # crosses an epoch boundary and the lr milestone; RCD's queue fills at step 2

    seed_everything(7)
    first = build(kind, distill_optim=distill_optim)
    first.train_steps(3)
    path = first.save(tmp_path / "half.pt")
    torch.manual_seed(12345)  # a resumed run must not depend on the RNG state it starts from
    resumed = build(kind, distill_optim=distill_optim)
    resumed.resume(path)
    resumed.train_steps(3)

    a, b = snapshot(straight), snapshot(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    assert resumed.step == straight.step == 6
    for ours, theirs in zip(resumed.schedulers, straight.schedulers, strict=True):
        assert ours.get_last_lr() == theirs.get_last_lr()
    assert straight.schedulers[0].get_last_lr() == [pytest.approx(0.01)]
    changed = [k for k in initial if not torch.equal(initial[k], a[k])]
    assert any("regression.adapter" in k or "head" in k for k in changed), "training changed nothing"
    if kind == "rcd":
        assert not torch.isnan(straight.stage.distill.log_z_t)  # the relational loss became active


def test_distill_optim_gives_the_critic_its_own_optimizer(tmp_path):
    trainer = build("rcd", distill_optim=CRITIC_ADAMW)
    model, critic = trainer.optimizers
    assert isinstance(model, torch.optim.SGD) and isinstance(critic, torch.optim.AdamW)
    critic_params = {id(p) for p in trainer.stage.distill.parameters()}
    assert {id(p) for g in critic.param_groups for p in g["params"]} == critic_params
    assert not critic_params & {id(p) for g in model.param_groups for p in g["params"]}
    assert critic.param_groups[0]["lr"] == 1e-3 and critic.param_groups[0]["weight_decay"] == 0.0
    before = [p.clone() for p in trainer.stage.distill.parameters()]
    trainer.train_steps(6)  # the milestone decays both optimizers' lr
    assert critic.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.stage.distill.parameters()))
    # the baseline (no distill module) ignores distill_optim; a checkpoint from a one-optimizer run is refused
    assert len(build("baseline", distill_optim=CRITIC_ADAMW).optimizers) == 1
    path = build("rcd").save(tmp_path / "one_optimizer.pt")
    with pytest.raises(ValueError, match="distill_optim"):
        trainer.resume(path)


def test_frozen_backbone_and_teacher_stay_fixed_in_stage2():
    trainer = build("rcd")
    before = copy.deepcopy(trainer.stage.state_dict())
    trainer.train_steps(3)
    after = trainer.stage.state_dict()
    for key in before:
        if key.startswith(("backbone.", "teacher.", "teacher_classifier.")):
            assert torch.equal(before[key], after[key]), f"{key} changed (running BN stats included)"
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert not trainer.stage.backbone.training and trainer.stage.head.training


def test_stage2_terms_are_weighted_losses():
    trainer = build("crd")
    stage = trainer.stage
    stage.train()
    distill_copy = copy.deepcopy(stage.distill)
    stage.distill.generator = torch.Generator().manual_seed(5)  # the same negatives in both calls
    distill_copy.generator = torch.Generator().manual_seed(5)
    views = _views(trainer)
    terms = stage.losses(views)
    assert set(terms) == {"cls", "kd", "crd"}
    emb = stage.head(stage.backbone(views.lr))
    emb_t = stage.teacher(views.hr)
    logits = stage.classifier(emb, views.labels)
    assert torch.allclose(terms["cls"], F.cross_entropy(logits.margin, views.labels))
    z_t = stage.teacher_classifier.s * stage.teacher_classifier.cosine(emb_t)
    assert torch.allclose(terms["kd"], 0.5 * kd_loss(logits.plain, z_t, 4.0))
    assert torch.allclose(terms["crd"], 2.0 * distill_copy(emb, emb_t, views.idx), atol=1e-6)


def _views(trainer):
    from gdrd_fast.train.loop import make_views
    batch = next(iter(trainer._loader(1)))
    return make_views(batch, trainer.runtime, **trainer.view_args)


def test_kd_loss_matches_float64_formula():
    z_s, z_t = torch.randn(7, 11, dtype=torch.float64), torch.randn(7, 11, dtype=torch.float64) * 3
    p_t = torch.softmax(z_t / 4, 1)
    expected = 16 * (p_t * (p_t.log() - torch.log_softmax(z_s / 4, 1))).sum(1).mean()
    assert torch.allclose(kd_loss(z_s, z_t, 4.0), expected, rtol=1e-12)


def test_views_flip_hr_and_lr_identically():
    trainer = build("baseline")
    views = _views(trainer)
    from gdrd_fast.data import degrade
    assert torch.equal(views.lr, degrade(views.hr, 4))  # LR is made from the (possibly flipped) HR view


def test_stage1_target_is_pooled_teacher_feature():
    trainer = build("stage1")
    stage, views = trainer.stage, _views(trainer)
    loss = stage.losses(views)["gen"]
    target = stage.teacher(F.interpolate(views.lr, size=12, mode="bicubic", align_corners=False).clamp(-1, 1))
    target = F.adaptive_avg_pool2d(target, 4)
    adapted = stage.regression.adapter(stage.backbone(views.lr))
    assert torch.allclose(loss, F.mse_loss(adapted, target), rtol=1e-5, atol=1e-7)


def test_stage1_teacher_input_is_clamped_after_the_bicubic_resize():
    """Bicubic overshoots at sharp edges; the teacher must still see values in [-1, 1]."""
    seen = []
    teacher = nn.Conv2d(3, 6, 4, 4)
    teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    stage = GenerativeStage(Runtime.create("cpu"), backbone(), teacher, FeatureRegressionLoss(8, 6), teacher_input=12)
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 * 2.0 - 1  # +-1 checkerboard
    lr = checker.expand(2, 3, 4, 4).contiguous()
    assert F.interpolate(lr, size=12, mode="bicubic", align_corners=False).abs().max() > 1  # the overshoot
    stage.losses(Views(lr, lr, torch.zeros(2, dtype=torch.long), torch.arange(2)))
    assert seen[0].shape[-1] == 12 and seen[0].min() >= -1 and seen[0].max() <= 1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_keeps_state_in_float32(amp):
    trainer = build("rcd", amp)
    terms = trainer.train_steps(3)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values()) and "rcd" in terms
    assert trainer.stage.distill.queue_s.values.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.stage.parameters())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = build("stage1")
    path = trainer.save(tmp_path / "c.pt")
    good = path.read_bytes()
    trainer.train_steps(1)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert path.read_bytes() == good and list(tmp_path.iterdir()) == [path]
    assert load_checkpoint(path)["step"] == 0


def test_resume_rejects_another_stage_and_missing_file(tmp_path):
    path = build("stage1").save(tmp_path / "s1.pt")
    trainer = build("rcd")
    before = copy.deepcopy(trainer.stage.state_dict())
    with pytest.raises(ValueError, match="stage1"):
        trainer.resume(path)
    with pytest.raises(ValueError, match="not found"):
        trainer.resume(tmp_path / "missing.pt")
    for key, value in before.items():  # NaN (unset) normalisers included
        torch.testing.assert_close(trainer.stage.state_dict()[key], value, rtol=0, atol=0, equal_nan=True)


def test_stage_arguments_are_checked():
    rt = Runtime.create("cpu")
    with pytest.raises(ValueError, match="teacher"):
        DiscriminativeStage(rt, backbone(), head(), ArcFaceHead(EMB, CLASSES), kd_weight=0.5)
    with pytest.raises(ValueError, match="teacher_classifier"):
        DiscriminativeStage(rt, backbone(), head(), ArcFaceHead(EMB, CLASSES), teacher=head(), kd_weight=0.5)
    with pytest.raises(TypeError, match="distill"):
        DiscriminativeStage(rt, backbone(), head(), ArcFaceHead(EMB, CLASSES), teacher=head(), kd_weight=0,
                            distill=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="amp"):
        Runtime.create("cpu", "fp8")


def test_save_removes_shard_files_an_earlier_sharded_save_left(tmp_path):
    trainer = build("crd")
    path = tmp_path / "stage2.pt"
    for rank in range(2):  # as a 2-rank sharded run would have left them
        (tmp_path / f"stage2.pt.rank{rank}").write_bytes(b"stale")
    trainer.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage2.pt"]
    build("crd").resume(path)


def test_recipe_parses_optional_sections_and_checks_them():
    from gdrd_fast.train import load_config
    config = load_config("paper", ["stage2.distill_optim={optimizer: adamw, lr: 1.0e-3, weight_decay: 0}",
                                   "stage2.crd.sharded=true", "sync_batchnorm=true"])
    assert config.stage2.distill_optim == OptimizerConfig(optimizer="adamw", lr=1e-3, weight_decay=0.0)
    assert config.stage2.crd.sharded and config.sync_batchnorm
    assert load_config("paper").stage2.distill_optim is None
    with pytest.raises(ValueError, match="stage2.distill_optim.milestones"):
        load_config("paper", ["stage2.distill_optim={milestones: [3]}"])  # a schedule belongs to the stage
    with pytest.raises(ValueError, match="optimizer must be one of"):
        load_config("paper", ["stage2.distill_optim={optimizer: lamb}"])
