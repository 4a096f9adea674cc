"""Everything a run needs is checked before its first step (train/checks.py), each failure naming its key;
untrained teachers are refused unless allow_random_teachers says so."""
import json

import pytest
import torch

from gdrd_fast import cli, models
from gdrd_fast.train import load_config
from gdrd_fast.train.checks import check_config, file_sha256
from gdrd_fast.train.pipeline import Trainer, train_gdrd

CLASSES = 3


class Faces(torch.utils.data.Dataset):
    """Three identities at 112 x 112, the paper's input size."""

    def __init__(self):
        self.targets = torch.arange(6) % CLASSES

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.zeros(3, 112, 112, dtype=torch.uint8), int(self.targets[i]), i


@pytest.fixture
def weights(tmp_path):
    """T_d (an IResNet-18 in insightface keys) and its ArcFace head over the training identities."""
    backbone, head = tmp_path / "r18_backbone.pth", tmp_path / "head.pt"
    torch.save(models.get_model("r18").state_dict(), backbone)
    torch.save(models.ArcFaceHead(512, CLASSES).state_dict(), head)
    return {"backbone": backbone, "head": head}


def paper(tmp_path, *overrides):
    """The paper recipe with a tiny diffusers T_g (random, said so), the given T_d files, a few steps."""
    return load_config("paper", ["device=cpu", "amp=none", "data.batch_size=2", "data.num_workers=0",
                                 "models.discriminative_teacher=r18", "models.generative_teacher=diffusers",
                                 "models.generative_teacher_config=tiny", "models.generative_teacher_input=56",
                                 "stage1.optim.steps=1", "stage2.optim.steps=1", "allow_random_teachers=true",
                                 f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a training step starts: the checks must fail first."""
    monkeypatch.setattr(Trainer, "train_steps", lambda *a, **k: pytest.fail("a training step started"))


@pytest.mark.diffusers
@pytest.mark.parametrize("case, key, words", [
    ("no head", "models.discriminative_teacher_head", "is not set"),
    ("head of the wrong shape", "models.discriminative_teacher_head", "file (10, 512) vs model (3, 512)"),
    ("no r50 file", "models.discriminative_teacher_weights", "no file or folder at"),
    ("wrong head path", "models.discriminative_teacher_head", "no file or folder at"),
    ("no validation file", "eval.val_targets[0]", "no file or folder at"),
])
def test_stage2_inputs_fail_before_the_first_step_of_stage1(case, key, words, tmp_path, weights, no_training):
    overrides = [f"models.discriminative_teacher_weights={weights['backbone']}",
                 f"models.discriminative_teacher_head={weights['head']}"]
    if case == "no head":
        overrides[1] = "models.discriminative_teacher_head=null"
    elif case == "head of the wrong shape":  # a head over 10 identities for a set of 3
        torch.save(models.ArcFaceHead(512, 10).state_dict(), weights["head"])
    elif case == "no r50 file":
        overrides[0] = f"models.discriminative_teacher_weights={tmp_path / 'r50.pth'}"
    elif case == "wrong head path":
        overrides[1] = f"models.discriminative_teacher_head={tmp_path / 'heads' / 'head.pt'}"
    else:
        overrides.append(f"eval.val_targets=[{tmp_path / 'lfw.bin'}]")
    with pytest.raises(ValueError) as failure:
        train_gdrd(paper(tmp_path, *overrides), dataset=Faces())
    message = str(failure.value)
    assert key in message and words in message and "\n" not in message
    assert not (tmp_path / "run" / "stage1.pt").exists()


@pytest.mark.diffusers
def test_a_checked_run_names_its_teachers_weights_and_their_hashes(tmp_path, weights):
    config = paper(tmp_path, f"models.discriminative_teacher_weights={weights['backbone']}",
                   f"models.discriminative_teacher_head={weights['head']}")
    train_gdrd(config, dataset=Faces())
    record = json.loads((tmp_path / "run" / "teachers.json").read_text())
    assert record["discriminative"]["weights"] == str(weights["backbone"])
    assert record["discriminative"]["sha256"] == file_sha256(weights["backbone"])
    assert record["discriminative"]["head_sha256"] == file_sha256(weights["head"])
    assert record["generative"] == {"key": "models.generative_teacher_weights", "weights": None, "sha256": None}
    log = (tmp_path / "run" / "train.log").read_text()
    assert file_sha256(weights["backbone"]) in log and "UNTRAINED" in log


def test_untrained_teachers_are_refused_in_one_line_unless_allowed(tmp_path, capsys):
    config = load_config("paper", [f"data.train_root={tmp_path}"])
    with pytest.raises(ValueError, match="untrained") as failure:
        check_config(config)
    message = str(failure.value)
    assert "models.generative_teacher_weights and models.discriminative_teacher_weights" in message
    assert "allow_random_teachers: true" in message
    # the baseline distils no teacher; CRD distils T_d only
    check_config(load_config("paper", [f"data.train_root={tmp_path}", "variant=baseline"]))
    with pytest.raises(ValueError) as failure:
        check_config(load_config("paper", [f"data.train_root={tmp_path}", "variant=crd", "stage2.kd_weight=0"]))
    assert "models.discriminative_teacher_weights not set" in str(failure.value)
    assert "generative" not in str(failure.value)
    allowed = load_config("paper", [f"data.train_root={tmp_path}", "allow_random_teachers=true",
                                    "stage2.kd_weight=0"])
    check_config(allowed)

    with pytest.raises(SystemExit) as exit_info:  # the command: one line, exit 2, before any model is built
        cli.main(["train", "--set", f"data.train_root={tmp_path}", "--set", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "allow_random_teachers" in err
    assert not (tmp_path / "run").exists()


def test_every_path_key_is_checked_before_anything_is_loaded(tmp_path):
    config = load_config("paper", [f"data.train_root={tmp_path / 'casia'}",
                                   f"models.generative_teacher_weights={tmp_path / 'pgdiff.pth'}",
                                   f"models.discriminative_teacher_weights={tmp_path / 'r50.pth'}",
                                   f"models.discriminative_teacher_head={tmp_path / 'head.pt'}"])
    with pytest.raises(ValueError) as failure:
        check_config(config)
    message = str(failure.value)
    for key in ("data.train_root", "models.generative_teacher_weights", "models.discriminative_teacher_weights",
                "models.discriminative_teacher_head"):
        assert f"{key}: no file or folder at" in message


@pytest.mark.diffusers
def test_dry_run_builds_every_stage_times_a_step_and_writes_nothing(tmp_path, weights, monkeypatch, capsys):
    from gdrd_fast.train.dryrun import dry_run, format_report
    steps = []
    real = Trainer.train_steps
    monkeypatch.setattr(Trainer, "train_steps", lambda self, n=None: steps.append((self.name, n)) or real(self, n))
    config = paper(tmp_path, f"models.discriminative_teacher_weights={weights['backbone']}",
                   f"models.discriminative_teacher_head={weights['head']}", "stage1.optim.steps=3",
                   "stage2.optim.steps=3")
    report = dry_run(config, dataset=Faces())
    assert steps == [("stage1", 1), ("stage1", 1), ("stage2", 1), ("stage2", 1)]  # a warm-up and a timed step
    assert set(report["stages"]) == {"stage1", "stage2"}
    assert all(s["seconds_per_step"] > 0 and s["peak_rss_gib"] > 0.1 for s in report["stages"].values())
    assert report["estimate_gib"] == report["peak_rss_gib"] and report["batch_size"] == 2
    assert not (tmp_path / "run").exists()
    text = format_report(report)
    assert "stage2:" in text and "s per step" in text and "peak RSS" in text

    # the command checks first: a wrong head fails before anything is built
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--dry-run", "--set", f"data.train_root={tmp_path}", "--set", "allow_random_teachers=true",
                  "--set", f"models.discriminative_teacher_head={tmp_path / 'nope.pt'}"])
    assert exit_info.value.code == 2 and "models.discriminative_teacher_head: no file" in capsys.readouterr().err
