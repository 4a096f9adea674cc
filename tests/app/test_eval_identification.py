import json

import pytest
import torch
import torch.nn.functional as F

from gdrd_fast.eval import (cmc, linear_probe, subset_report, verify, write_identification_report,
                            write_verification_report)


def test_cmc_hand_computed():
    # Gallery: one image per identity 0..3 on the unit circle's axes; cosine scores are exact.
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.arange(4)
    # Probe of id 0 points at id 0 (rank 1); probe of id 2 sits between ids 1 and 2, nearer 1 (rank 2);
    # probe of id 3 points at id 1 (scores: id1 1, id0 0, id2 0, id3 -1 -> rank 4).
    probes = torch.tensor([[1.0, 0.1], [-0.6, 0.8], [0.0, 1.0]])
    probe_labels = torch.tensor([0, 2, 3])
    assert cmc(gallery, labels, probes, probe_labels, ranks=(1, 2, 3, 4)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0}


def test_cmc_ties_count_against_the_probe():
    gallery, probes = torch.ones(5, 3), torch.ones(4, 3)      # every score equal
    assert cmc(gallery, torch.arange(5), probes, torch.tensor([0, 1, 2, 3]), ranks=(1, 4, 5)) == {1: 0.0, 4: 0.0, 5: 1.0}


def test_cmc_random_features_near_chance():
    ids = 50
    gallery, probes = torch.randn(ids, 32), torch.randn(10 * ids, 32)
    result = cmc(gallery, torch.arange(ids), probes, torch.arange(ids).repeat(10))
    for k, value in result.items():
        assert abs(value - k / ids) < 0.08


def test_cmc_rejects_unknown_probe_identity():
    with pytest.raises(ValueError, match="probe_labels"):
        cmc(torch.randn(3, 4), torch.arange(3), torch.randn(2, 4), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="gallery_labels"):
        cmc(torch.randn(3, 4), torch.arange(2), torch.randn(2, 4), torch.tensor([0, 1]))


def test_linear_probe_separable_and_random():
    centres = F.normalize(torch.randn(12, 16), dim=1)
    labels = torch.arange(12).repeat(8)
    features = centres[labels] + 0.05 * torch.randn(len(labels), 16)   # noise norm ~0.2
    train, test = slice(0, 60), slice(60, None)
    assert linear_probe(features[train], labels[train], features[test], labels[test], max_iter=30) >= 0.95
    noise = torch.randn(len(labels), 16)
    assert linear_probe(noise[train], labels[train], noise[test], labels[test], max_iter=30) < 0.35   # chance = 1/12
    # Identities never seen in training are errors, not skipped.
    unseen = linear_probe(features[train], labels[train], features[test], labels[test] + 100, max_iter=30)
    assert unseen == 0.0


def test_subset_report():
    gallery = F.normalize(torch.randn(10, 8), dim=1)
    labels = torch.arange(10)
    report = subset_report(gallery, labels, {"clean": (gallery, labels), "noisy": (gallery + 5 * torch.randn(10, 8), labels)})
    assert report["clean"] == {"probes": 10, "cmc": {1: 1.0, 5: 1.0, 10: 1.0, 20: 1.0}}
    assert report["noisy"]["cmc"][10] == 1.0 and report["noisy"]["cmc"][1] < 1.0


def test_report_files_name_the_dataset(tmp_path):
    e = F.normalize(torch.randn(200, 8), dim=1)
    result = verify(e[:100], F.normalize(e[:100] + 0.3 * torch.randn(100, 8), dim=1), torch.rand(100) < 2)
    paths = write_verification_report(tmp_path, "synthetic-faces(seed=3)", {"student 16x16": result})
    payload = json.loads(paths["json"].read_text())
    assert payload["dataset"] == "synthetic-faces(seed=3)"
    assert payload["results"]["student 16x16"]["accuracy"] == result.accuracy
    md = paths["markdown"].read_text()
    assert "synthetic-faces(seed=3)" in md and "| student 16x16 |" in md
    assert paths["roc"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identification_report(tmp_path):
    gallery = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.arange(6)
    result = cmc(gallery, labels, gallery, labels)
    subsets = {"student": subset_report(gallery, labels, {"scarf": (gallery[:3], labels[:3])})}
    paths = write_identification_report(tmp_path, "synthetic-faces(seed=1)", {"student": result},
                                        {"student": 0.5}, subsets)
    payload = json.loads(paths["json"].read_text())
    assert payload["dataset"] == "synthetic-faces(seed=1)" and payload["cmc"]["student"]["1"] == 1.0
    assert payload["subsets"]["student"]["scarf"]["probes"] == 3
    md = paths["markdown"].read_text()
    assert "| student | 100.00 | 100.00 | 100.00 | 100.00 | 50.00 |" in md and "| scarf | 3 |" in md
