"""gdrd_fast's losses inside torchdistill's real DistillationBox (skipped where torchdistill is absent)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("torchdistill")
from torchdistill.core.distillation import DistillationBox
from torchdistill.losses.mid_level import CRDLoss as TorchdistillOwnCRDLoss
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT

from gdrd_fast.integrations import torchdistill as integration

N_DATA, BATCH, EMBED = 24, 6, 16


class TinyNet(nn.Module):
    def __init__(self, channels: int, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.avgpool(self.features(x)).flatten(1))


class TinyImages(torch.utils.data.Dataset):
    """What CRDDatasetWrapper needs: .classes, .targets, (image, target) items."""

    def __init__(self):
        self.images = torch.randn(N_DATA, 3, 8, 8)
        self.targets = [i % 3 for i in range(N_DATA)]
        self.classes = ["a", "b", "c"]

    def __len__(self):
        return N_DATA

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def _wrapper(in_features):
    return f"""
  auxiliary_model_wrapper:
    key: 'Linear4CRD'
    kwargs:
      input_module_path: 'model.avgpool'
      linear_kwargs: {{in_features: {in_features}, out_features: {EMBED}, bias: True}}
      power: 2"""


CONFIG = f"""
num_epochs: 1
train_data_loader:
  dataset_id: 'tiny'
  dataset_wrapper:
    key: 'CRDDatasetWrapper'
    kwargs: {{num_negative_samples: 5, mode: 'exact', ratio: 1.0}}
  kwargs: {{batch_size: {BATCH}, num_workers: 0, drop_last: True}}
teacher:
  forward_proc: 'forward_batch_supp_dict'
  sequential: []{_wrapper(8)}
  forward_hook:
    input: []
    output: ['model.avgpool', 'model.features', 'normalizer']
  wrapper:
  requires_grad: True
  frozen_modules: ['model']
student:
  forward_proc: 'forward_batch_supp_dict'
  adaptations:
  sequential: []{_wrapper(4)}
  forward_hook:
    input: ['empty']
    output: ['model.avgpool', 'model.features', 'normalizer']
  wrapper:
  requires_grad: True
  frozen_modules: []
optimizer:
  key: 'SGD'
  kwargs: {{lr: 0.5}}
criterion:
  key: 'WeightedSumLoss'
  kwargs:
    sub_terms:
      term:
        criterion: CRITERION
        weight: 1.0
"""

IO = {"student_module_path": "normalizer", "student_module_io": "output", "teacher_module_path": "normalizer",
          "teacher_module_io": "output"}
CRITERIA = {
    "gdrd_fast.CRDLoss": {"student_norm_module_path": "normalizer", "student_empty_module_path": "empty",
                              "teacher_norm_module_path": "normalizer", "input_size": EMBED, "output_size": N_DATA,
                              "num_negative_samples": 5, "num_samples": N_DATA, "temperature": 0.07, "momentum": 0.5,
                              "eps": 1e-7},
    "gdrd_fast.InfoNCEBankLoss": dict(IO, input_size=EMBED, queue_size=8, temperature=0.2),
    "gdrd_fast.RelationalContrastiveLoss": dict(IO, input_size=EMBED, num_samples=N_DATA, output_size=8,
                                                num_negative_samples=4, queue_size=BATCH),
    "gdrd_fast.FeatureRegressionLoss": {"student_module_path": "model.features", "student_module_io": "output",
                                            "teacher_module_path": "model.features", "teacher_module_io": "output",
                                            "in_channels": 4, "out_channels": 8},
}


def _box(key, kwargs=None):
    config = yaml.safe_load(CONFIG)
    config["train_data_loader"]["sampler"] = {"class_or_func": torch.utils.data.SequentialSampler, "kwargs": None}
    config["criterion"]["kwargs"]["sub_terms"]["term"]["criterion"] = {"key": key, "kwargs": kwargs or CRITERIA[key]}
    teacher, student = TinyNet(8), TinyNet(4)
    box = DistillationBox(teacher, student, {"tiny": TinyImages()}, config, torch.device("cpu"), None, False, 1)
    return box, student


@pytest.mark.parametrize("key", list(CRITERIA))
def test_distillation_box_runs_forward_and_backward_with_each_registered_loss(key):
    assert MIDDLE_LEVEL_LOSS_DICT[key].__module__ == integration.__name__
    box, student = _box(key)
    owned = integration.loss_parameters(box.criterion)
    assert integration.train_loss_parameters(box) == len(owned)
    # what each loss must train: the student's conv, the loss's own weights, and Linear4CRD's embedding
    trained = [student.features[0].weight, *owned]
    if key != "gdrd_fast.FeatureRegressionLoss":
        trained.append(box.student_model.normalizer.linear.weight)
    before = [p.detach().clone() for p in trained]
    losses = []
    for sample, targets, supp in box.train_data_loader:
        loss = box.forward_process(sample, targets, supp)
        losses.append(loss.detach())
        box.post_forward_process(loss=loss)  # backward and optimizer step
        if len(losses) == 2:  # the relational queue is full after the first batch: its loss starts on the second
            break
    assert all(bool(torch.isfinite(x)) for x in losses) and float(losses[-1]) > 0
    assert all(not torch.equal(a, b) for a, b in zip(before, trained)), "some weight got no update"


def test_crd_key_takes_torchdistills_own_crd_arguments_and_matches_its_loss():
    """Same kwargs, same banks, same embeddings and contrast_idx: the installed torchdistill's CRDLoss and ours."""
    kwargs = CRITERIA["gdrd_fast.CRDLoss"]
    theirs = TorchdistillOwnCRDLoss(**kwargs).double()
    ours = integration.TorchdistillCRDLoss(**kwargs)
    ours.crd.memory_s.rows = theirs.memory_v1.clone()
    ours.crd.memory_t.rows = theirs.memory_v2.clone()
    ours.double()
    for step in range(3):  # Z frozen on the first step, banks updated on every step
        v_s = nn.functional.normalize(torch.randn(BATCH, EMBED, dtype=torch.float64), dim=1).requires_grad_()
        v_t = nn.functional.normalize(torch.randn(BATCH, EMBED, dtype=torch.float64), dim=1).requires_grad_()
        idx = torch.randperm(N_DATA)[:BATCH]
        contrast_idx = torch.cat([idx[:, None], torch.randint(N_DATA, (BATCH, 5))], 1)
        supp = {"pos_idx": idx, "contrast_idx": contrast_idx}
        io = ({"normalizer": {"output": v_s}, "empty": {"input": supp}}, {"normalizer": {"output": v_t}})
        want = theirs(*io)
        got = ours(*io)
        g_want = torch.autograd.grad(want, [v_s, v_t]) if step else None
        # torchdistill keeps Z in a float32 buffer and T = float32(0.07): agreement is float32-level
        assert abs(float(got.detach()) - float(want.detach())) < 1e-5 * max(1.0, abs(float(want.detach())))
        if g_want is not None:
            for a, b in zip(torch.autograd.grad(got, [v_s, v_t]), g_want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.crd.memory_s.rows, theirs.memory_v1)
        torch.testing.assert_close(ours.crd.memory_t.rows, theirs.memory_v2)


def test_crd_key_refuses_a_bank_size_other_than_the_dataset():
    with pytest.raises(ValueError, match="output_size"):
        integration.TorchdistillCRDLoss(**{**CRITERIA["gdrd_fast.CRDLoss"], "output_size": N_DATA + 1})


def test_switching_page_snippet_runs_in_a_distillation_box():
    """docs/switching/torchdistill.md: its import line and its YAML term (sizes shrunk to the tiny data)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "switching" / "torchdistill.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    exec(compile(code, "torchdistill.md", "exec"), {})  # noqa: S102 (our own docs)
    (term,) = re.findall(r"```yaml\n(.*?)```", page, flags=re.DOTALL)
    term = yaml.safe_load(term)["crd"]
    assert term["criterion"]["kwargs"].keys() == CRITERIA["gdrd_fast.CRDLoss"].keys()
    term["criterion"]["kwargs"].update(input_size=EMBED, output_size=N_DATA, num_samples=N_DATA,
                                       num_negative_samples=5)
    box, _ = _box(term["criterion"]["key"], term["criterion"]["kwargs"])
    sample, targets, supp = next(iter(box.train_data_loader))
    loss = box.forward_process(sample, targets, supp)
    box.post_forward_process(loss=loss)
    assert bool(torch.isfinite(loss)) and float(loss.detach()) > 0


def _seeded_first_step(key, seed):
    """A whole run's start under one seed (models, data, box, criterion, shuffled sampler): the banks as
    built, the first batch's sample ids and the first step's loss."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)  # CRDDatasetWrapper draws its negatives with numpy
    config = yaml.safe_load(CONFIG)
    config["train_data_loader"]["sampler"] = {"class_or_func": torch.utils.data.RandomSampler, "kwargs": None}
    config["criterion"]["kwargs"]["sub_terms"]["term"]["criterion"] = {"key": key,
                                                                      "kwargs": CRITERIA["gdrd_fast.CRDLoss"]}
    teacher, student = TinyNet(8), TinyNet(4)
    box = DistillationBox(teacher, student, {"tiny": TinyImages()}, config, torch.device("cpu"), None, False, 1)
    term = box.criterion.term_dict["term"][0]
    banks = ((term.memory_v1, term.memory_v2) if key == "CRDLoss"
             else (term.crd.memory_s.rows, term.crd.memory_t.rows))
    banks = tuple(b.detach().clone() for b in banks)
    sample, targets, supp = next(iter(box.train_data_loader))
    return banks, supp["pos_idx"], box.forward_process(sample, targets, supp)


def test_same_seed_same_banks_same_data_order_and_first_loss_as_torchdistills_crd():
    theirs = _seeded_first_step("CRDLoss", 17)
    ours = _seeded_first_step("gdrd_fast.CRDLoss", 17)
    assert all(torch.equal(a, b) for a, b in zip(theirs[0], ours[0])), "the banks differ"
    assert torch.equal(theirs[1], ours[1]), "the data order differs"
    want, got = float(theirs[2].detach()), float(ours[2].detach())
    assert abs(got - want) <= 1e-5 * abs(want)  # both float32


def test_switching_page_dependencies_entry_registers_the_keys_in_a_fresh_process():
    """The page's YAML `dependencies:` goes through torchdistill's own import_dependencies, no import of ours."""
    import subprocess
    import sys

    page = (Path(__file__).resolve().parents[2] / "docs" / "switching" / "torchdistill.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", page, flags=re.DOTALL)
    dependencies = yaml.safe_load(block)["dependencies"]
    code = ("import sys\nfrom torchdistill.common.main_util import import_dependencies\n"
            "from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT\n"
            "assert 'gdrd_fast' not in sys.modules\n"
            f"import_dependencies({dependencies!r})\n"
            "print(sorted(k for k in MIDDLE_LEVEL_LOSS_DICT if k.startswith('gdrd_fast.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'gdrd_fast.CRDLoss'" in out.stdout and "'gdrd_fast.InfoNCEBankLoss'" in out.stdout
