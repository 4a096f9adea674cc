"""Every training variant (config.VARIANTS): it trains, resumes bit for bit mid-stage, and its student evaluates."""
import pytest
import torch
from torch import nn
from train_cases import CLASSES, EMB, N_DATA, Faces

from gdrd_fast.eval import linear_probe
from gdrd_fast.models import ArcFaceHead
from gdrd_fast.train import OptimConfig, Runtime, Trainer, seed_everything
from gdrd_fast.train.config import GENERATIVE_VARIANTS, VARIANTS, Stage2Config, load_config
from gdrd_fast.train.pipeline import Parts, variant_plan


class Backbone(nn.Sequential):
    out_channels = 8

    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))


class Teacher(nn.Conv2d):
    """A generative teacher declaring its input size and feature shape (6 x 3 x 3 at 12 px)."""
    input_size, feature_shape = 12, (6, 3, 3)

    def __init__(self):
        super().__init__(3, 6, 4, 4)


def head():
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, EMB), nn.BatchNorm1d(EMB))


def parts():
    """Fresh modules; a resumed trainer must overwrite all of them."""
    runtime = Runtime.create("cpu")
    return Parts(runtime, Backbone(), head(), lambda: ArcFaceHead(EMB, CLASSES, s=8.0, m=0.3),
                 lambda: (nn.Sequential(Backbone(), head()), ArcFaceHead(EMB, CLASSES, s=8.0, m=0.3)),
                 Teacher, N_DATA, EMB, timestep=0, noise=0.1)


STAGE2 = Stage2Config(optim=OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=4), gen_weight=0.5,
                      backbone_lr_factor=0.5)
STAGE2.rcd.num_negatives, STAGE2.rcd.queue_size, STAGE2.rcd.rel_dim = 5, 8, 8
STAGE2.crd.feat_dim, STAGE2.crd.nce_k = 8, 7
STAGE1 = OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=3)
SINGLE = OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=5)


def run(variant, stop_after=None, resume=None, tmp=None):
    """Train every stage of the variant; stop after `stop_after` total steps (saving), or resume from a file."""
    seed_everything(11)
    p = parts()
    plan = variant_plan(variant, p, STAGE1, STAGE2, SINGLE)
    state = torch.load(resume, weights_only=True) if resume is not None else None
    done, trainers = 0, []
    for planned in plan:
        trainer = Trainer(planned.build(), Faces(), p.runtime, planned.optim, batch_size=4, seed=3, resolution=4,
                          progress=False, group_optims=planned.group_optims, meta={"variant": variant})
        trainers.append(trainer)
        if state is not None:
            if state["stage"] != planned.name:
                continue  # finished before the checkpoint; its result is in the checkpoint's modules
            trainer.load_state_dict(state)
            state = None
        left = trainer.total_steps - trainer.step
        if stop_after is not None and done + left > stop_after:
            trainer.train_steps(stop_after - done)
            return trainer.save(tmp / "mid.pt"), None
        trainer.train_steps()
        done += left
    return plan, p, trainers


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_resumes_bit_exactly_and_evaluates(variant, tmp_path):
    plan, p, trainers = run(variant)
    names = [planned.name for planned in plan]
    expected = {"gdrd": ["stage1", "stage2"], "gdrd-unfrozen": ["stage1", "stage2"], "stage1-probe": ["stage1"]}
    assert names == expected.get(variant, ["single"])
    last = trainers[-1]
    terms = set(last.history[-1]) - {"step", "loss"}
    expected_terms = {"gdrd": {"cls", "kd", "rcd"}, "gdrd-unfrozen": {"cls", "kd", "rcd"},
                      "gdrd-e2e": {"gen", "cls", "kd", "rcd"}, "crrcd": {"cls", "kd", "rcd"},
                      "crd": {"cls", "kd", "crd"}, "kd": {"cls", "kd"}, "baseline": {"cls"}, "stage1-probe": {"gen"}}
    assert terms == expected_terms[variant]
    straight = {k: v.clone() for k, v in (*p.backbone.state_dict().items(),
                                         *(("head." + k, v) for k, v in p.head.state_dict().items()))}

    total = sum(t.total_steps for t in trainers)
    path, _ = run(variant, stop_after=total - 2, tmp=tmp_path)  # stops inside the last stage
    torch.manual_seed(999)
    _, q, resumed = run(variant, resume=path)
    again = {k: v for k, v in (*q.backbone.state_dict().items(),
                               *(("head." + k, v) for k, v in q.head.state_dict().items()))}
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), f"{variant}: {key} differs after resume"

    # what changed: the backbone trains in stage 1 or in a one-stage variant, never in gdrd's stage 2
    if variant == "gdrd":
        assert not any(p.requires_grad for p in q.backbone.parameters())
    # evaluation: a linear probe on the student's frozen features (backbone features for stage1-probe)
    faces = Faces()
    with torch.no_grad():
        q.backbone.eval(), q.head.eval()
        feats = q.backbone(faces.images)
        feats = feats.flatten(1) if variant == "stage1-probe" else q.head(feats)
    train = torch.arange(N_DATA) < 12
    acc = linear_probe(feats[train], faces.labels[train], feats[~train], faces.labels[~train])
    assert 0.0 <= acc <= 1.0


def test_unfrozen_backbone_gets_its_own_learning_rate_and_e2e_its_weight():
    seed_everything(1)
    p = parts()
    stage1, stage2 = variant_plan("gdrd-unfrozen", p, STAGE1, STAGE2, SINGLE)
    stage1.build()
    trainer = Trainer(stage2.build(), Faces(), p.runtime, stage2.optim, batch_size=4, resolution=4, progress=False,
                      group_optims=stage2.group_optims)
    lrs = sorted(o.param_groups[0]["lr"] for o in trainer.optimizers)
    assert lrs == [pytest.approx(0.05), pytest.approx(0.1)]
    backbone_ids = {id(x) for x in p.backbone.parameters()}
    own = [o for o in trainer.optimizers if o.param_groups[0]["lr"] == pytest.approx(0.05)][0]
    assert {id(x) for g in own.param_groups for x in g["params"]} == backbone_ids

    (single,) = variant_plan("gdrd-e2e", parts(), STAGE1, STAGE2, SINGLE)
    stage = single.build()
    assert stage.gen_weight == 0.5 and stage.generative.noise == 0.1 and stage.generative.input_size == 12


def test_variant_is_a_checked_recipe_field_and_resume_refuses_another_variant(tmp_path):
    assert load_config("paper", ["variant=gdrd-e2e"]).variant == "gdrd-e2e"
    with pytest.raises(ValueError, match="variant must be one of"):
        load_config("paper", ["variant=gdrd-fast"])
    config = load_config("paper", ["stage1.optim.steps=10", "stage2.optim.steps=20"])
    assert config.one_stage_optim.steps == 30 and config.one_stage_optim.epochs == 72
    seed_everything(0)
    p = parts()
    (planned, _) = variant_plan("gdrd", p, STAGE1, STAGE2, SINGLE)
    trainer = Trainer(planned.build(), Faces(), p.runtime, planned.optim, batch_size=4, resolution=4,
                      progress=False, meta={"variant": "gdrd"})
    path = trainer.save(tmp_path / "stage1.pt")
    other = Trainer(planned.build(), Faces(), p.runtime, planned.optim, batch_size=4, resolution=4,
                    progress=False, meta={"variant": "stage1-probe"})
    with pytest.raises(ValueError, match="variant 'gdrd' there, 'stage1-probe' here"):
        other.resume(path)


def test_generative_target_runs_the_teacher_at_its_timestep_and_noise():
    from gdrd_fast.train.stages import GenerativeTarget
    calls = []

    class Recorder(nn.Module):
        def forward(self, x, timestep=0):
            calls.append((x.clone(), timestep))
            return x[:, :2]

    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    target = GenerativeTarget(Recorder(), input_size=8, timestep=250, noise=0.6)
    torch.manual_seed(3)
    out = target(lr, (4, 4))
    torch.manual_seed(3)
    clean = torch.nn.functional.interpolate(lr, size=8, mode="bicubic", align_corners=False).clamp(-1, 1)
    expected = 0.8 * clean + 0.6 * torch.randn_like(clean)
    x, t = calls[0]
    assert t == 250 and torch.allclose(x, expected, atol=1e-6)
    assert out.shape == (2, 2, 4, 4)  # pooled from 8x8 onto the student's 4x4 grid
    GenerativeTarget(Recorder())(lr, (4, 4))
    assert calls[-1][1] == 0 and torch.equal(calls[-1][0], lr)  # the paper's default: clean input, t = 0
    for bad in (dict(noise=1.0), dict(noise=-0.1), dict(timestep=-1), dict(timestep=2.5)):
        with pytest.raises(ValueError, match="noise|timestep"):
            GenerativeTarget(Recorder(), **bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_generative_variants_build_the_generative_teacher(variant):
    """The ablation grid starts the other variants' cells while the generative teacher is still training."""
    built = []
    p = parts()
    p.generative = lambda: built.append(1) or Teacher()
    for planned in variant_plan(variant, p, STAGE1, STAGE2, SINGLE):
        planned.build()
    assert bool(built) == (variant in GENERATIVE_VARIANTS)
