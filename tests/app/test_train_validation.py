"""Validation during training: a tiny two-stage run on a packed .rec with two .bin targets writes
metrics.csv rows for both, TensorBoard scalars and best.pt (the student of the best first-target row)."""
import csv
import importlib.util
import sys

import pytest
import torch

from gdrd_fast import models
from gdrd_fast.data import degrade, load_pairs_bin, pack_folder, read_pairs_bin, write_pairs_bin, write_synthetic_dataset
from gdrd_fast.eval import extract_embeddings, verify
from gdrd_fast.train import load_checkpoint, load_config
from gdrd_fast.train.pipeline import train_gdrd
from gdrd_fast.train.validation import METRICS_COLUMNS, ScalarLogger


@pytest.mark.diffusers
@pytest.mark.slow
def test_two_stage_run_on_a_rec_validates_both_targets(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_train_identities=3, images_per_identity=4,
                                   num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2,
                                   image_size=112)
    rec, _ = pack_folder(data["train"], tmp_path / "webface" / "train.rec", progress=False)
    lfw = data["pairs"]
    encoded, issame = read_pairs_bin(lfw)   # a second target: the same faces, pairs in reverse order
    pairs = [encoded[i:i + 2] for i in range(0, len(encoded), 2)][::-1]
    second = tmp_path / "cfp_fp.bin"
    write_pairs_bin(second, [b for p in pairs for b in p], issame[::-1])
    head = tmp_path / "teacher_head.pt"
    torch.save(models.ArcFaceHead(512, 3).state_dict(), head)
    out = tmp_path / "run"
    config = load_config("paper", [
        f"data.train_root={rec.parent}", "data.batch_size=4", "data.num_workers=0", "amp=none", "device=cpu",
        "models.discriminative_teacher=r18", f"models.discriminative_teacher_head={head}",
        "models.generative_teacher=diffusers", "models.generative_teacher_config=tiny",
        "models.generative_teacher_input=56", "stage1.optim.steps=2", "stage2.optim.steps=3",
        "stage2.rcd.queue_size=4", "stage2.rcd.num_negatives=3", "log_every=1", f"output_dir={out}",
        "allow_random_teachers=true",
        f"eval.val_targets=[{lfw}, {second}]", "eval.val_every=2", "data.resolution=16"])
    train_gdrd(config)

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == METRICS_COLUMNS
    # step 2 (the interval) and step 3 (the end of stage 2); stage 1 does not train the output
    assert [(r["step"], r["stage"], r["target"], r["resolution"]) for r in rows] == [
        ("2", "stage2", lfw.stem, "16"), ("2", "stage2", "cfp_fp", "16"),
        ("3", "stage2", lfw.stem, "16"), ("3", "stage2", "cfp_fp", "16")]
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["auc"]) <= 1 and float(r["std"]) >= 0
    # same pairs in another order: the same ROC (AUC), so the second target was really verified
    assert rows[0]["auc"] == rows[1]["auc"] and rows[2]["auc"] == rows[3]["auc"]

    # best.pt is the student at the best first-target row: re-verifying it reproduces that accuracy
    best = max(float(r["accuracy"]) for r in rows if r["target"] == lfw.stem)
    net = models.load_backbone(load_checkpoint(out / "best.pt"), "r18").eval()
    images, same = load_pairs_bin(lfw, progress=False)
    emb = extract_embeddings(net, images, transform=lambda x: degrade(x, 16), progress=False)
    assert verify(emb[0::2], emb[1::2], same).accuracy == pytest.approx(best, abs=1e-12)

    if importlib.util.find_spec("tensorboard") is None:  # the CSV fallback holds the same loss terms
        with open(out / "losses.csv", newline="") as f:
            logged = list(csv.DictReader(f))
        assert {("stage1", "gen"), ("stage1", "loss"), ("stage2", "cls"), ("stage2", "rcd"),
                ("stage2", "loss")} <= {(r["stage"], r["term"]) for r in logged}
        assert [r["step"] for r in logged if (r["stage"], r["term"]) == ("stage2", "cls")] == ["1", "2", "3"]
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"stage1/gen", "stage1/loss", "stage2/cls", "stage2/rcd", "stage2/loss",
            f"val/{lfw.stem}/accuracy", "val/cfp_fp/accuracy"} <= tags
    assert [e.step for e in events.Scalars("stage2/cls")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("val/cfp_fp/accuracy")] == pytest.approx(
        [float(r["accuracy"]) for r in rows if r["target"] == "cfp_fp"])


def test_losses_go_to_csv_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    logger = ScalarLogger(tmp_path)
    logger.add("stage2", 1, {"cls": 2.5, "loss": 3.0})
    logger.add("stage2", 2, {"cls": 2.0, "loss": 2.25})
    logger.close()
    with open(tmp_path / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["stage"], r["term"], float(r["value"])) for r in rows] == [
        ("1", "stage2", "cls", 2.5), ("1", "stage2", "loss", 3.0), ("2", "stage2", "cls", 2.0),
        ("2", "stage2", "loss", 2.25)]
    assert not list(tmp_path.glob("events.out.tfevents*"))


def test_validator_keeps_the_best_across_a_resume_and_rejects_bad_targets(tmp_path):
    from gdrd_fast.train.validation import Validator
    pairs = tmp_path / "lfw.bin"
    write_pairs_bin(pairs, torch.rand(40, 3, 16, 16) * 2 - 1, [True, False] * 10)
    (tmp_path / "metrics.csv").write_text(",".join(METRICS_COLUMNS) + "\n1,stage2,lfw,8,0.9,0,0,0,0\n"
                                          "2,stage2,lfw,16,0.7,0,0,0,0\n3,stage2,lfw,16,0.75,0,0,0,0\n")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    validator = Validator(net, [pairs], tmp_path, resolution=16, image_size=16, progress=False)
    assert validator.best == {"lfw": 0.75}         # the 8x8 row is another protocol
    rows = validator.validate(4, "stage2", torch.device("cpu"))
    assert rows[0]["accuracy"] <= 0.75 or (tmp_path / "best.pt").is_file()
    assert (tmp_path / "best.pt").is_file() == (rows[0]["accuracy"] > 0.75)
    for targets, every, match in (([], 1, "empty"), ([tmp_path / "x.bin"], 1, "not a file"),
                                  ([pairs, pairs], 1, "share a name"), ([pairs], -1, "val_every")):
        with pytest.raises(ValueError, match=match):
            Validator(net, targets, tmp_path, every=every)
