"""The recipe-driven pipeline: train both stages, resume, evaluate; the paper recipe at its real sizes."""
import json

import pytest
import torch
import torch.nn.functional as F

from gdrd_fast import RelationalContrastiveLoss, cli, models
from gdrd_fast.data import write_synthetic_dataset
from gdrd_fast.train import Runtime, Trainer, load_checkpoint, load_config
from gdrd_fast.train.pipeline import build_stage1, build_stage2, train_gdrd


@pytest.mark.diffusers
@pytest.mark.slow
def test_train_resume_and_eval_on_small_data(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_train_identities=3, images_per_identity=4,
                                   num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2,
                                   image_size=112)
    head = tmp_path / "teacher_head.pt"
    torch.save(models.ArcFaceHead(512, 3).state_dict(), head)
    overrides = [f"data.train_root={data['train']}", "data.batch_size=4", "data.num_workers=0", "amp=none",
                 "device=cpu", "models.discriminative_teacher=r18", f"models.discriminative_teacher_head={head}",
                 "models.generative_teacher=diffusers", "models.generative_teacher_config=tiny",
                 "models.generative_teacher_input=56", "stage1.optim.steps=2", "stage2.optim.steps=2",
                 "stage2.rcd.queue_size=4", "stage2.rcd.num_negatives=3", "log_every=1",
                 "allow_random_teachers=true"]
    first = train_gdrd(load_config("paper", overrides + [f"output_dir={tmp_path / 'a'}"]))
    assert load_checkpoint(tmp_path / "a" / "stage1.pt")["step"] == 2
    stage2 = load_checkpoint(tmp_path / "a" / "stage2.pt")
    assert stage2["step"] == 2 and not torch.isnan(stage2["modules"]["distill.log_z_t"])  # RCD was active
    log = (tmp_path / "a" / "train.log").read_text()
    assert "stage1 step 2/2" in log and "stage2 step 2/2" in log and " rcd " in log

    # a run resumed from the finished stage-1 checkpoint ends with the same student, bit for bit
    second = train_gdrd(load_config("paper", overrides + [f"output_dir={tmp_path / 'b'}"]),
                        resume=tmp_path / "a" / "stage1.pt")
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "layer4.0.conv1.weight" in a  # insightface keys: loadable by `gdrd-fast eval` and insightface

    assert cli.main(["eval", "--weights", str(first), "--arch", "r18", "--pairs", str(data["pairs"]),
                     "--resolutions", "16", "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["results"]["r18 16x16"]["num_pairs"] == 20


@pytest.mark.slow
def test_paper_recipe_one_step_at_real_sizes(tmp_path):
    """IResNet-18 student, PGDiff FFHQ-512 encoder at 448, IResNet-50 teacher, CASIA's 10,575 classes and
    494,414 bank rows, RCD with K=512 from a full 16,384 queue; a batch of 4 instead of 96 to fit a CPU test."""
    config = load_config("paper", ["amp=none", "device=cpu"])
    runtime, batch, n_data, classes = Runtime.create("cpu"), 4, 494_414, 10_575
    student = models.build_student("r18")

    class RandomFaces(torch.utils.data.Dataset):
        def __len__(self):
            return batch

        def __getitem__(self, i):
            return torch.rand(3, 112, 112) * 2 - 1, int(torch.randint(classes, ())), int(torch.randint(n_data, ()))

    stage1 = build_stage1(config, runtime, student)
    assert stage1.regression.adapter.weight.shape == (512, 256, 1, 1)
    with torch.no_grad():
        tap = stage1.teacher(torch.zeros(1, 3, 448, 448))
    assert tap.shape == (1, 512, 14, 14)
    Trainer(stage1, RandomFaces(), runtime, config.stage1.optim, batch_size=batch, progress=False).train_steps(1)

    config.models.discriminative_teacher_head = str(tmp_path / "r50_casia_head.pt")
    torch.save(models.ArcFaceHead(512, classes).state_dict(), config.models.discriminative_teacher_head)
    stage2 = build_stage2(config, runtime, student, classes, n_data)
    assert isinstance(stage2.distill, RelationalContrastiveLoss) and stage2.classifier.weight.shape == (classes, 512)
    queue_t, queue_s = stage2.distill.queue_t, stage2.distill.queue_s
    assert queue_t.size == 16384 and stage2.distill.num_negatives == 512
    queue_t.push_(F.normalize(torch.randn(16384, 512), dim=1), torch.randint(classes, (16384,)))
    queue_s.push_(F.normalize(torch.randn(16384, 512), dim=1))
    backbone_before = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    head_before = student.net.fc.weight.clone()
    terms = Trainer(stage2, RandomFaces(), runtime, config.stage2.optim, batch_size=batch,
                    progress=False).train_steps(1)
    assert set(terms) == {"cls", "kd", "rcd", "loss"} and terms["rcd"] > 0
    assert all(torch.equal(v, student.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert not torch.equal(head_before, student.net.fc.weight)
