"""The benchmark commands over their released layouts, on synthetic folders made here: TinyFace (CMC over
the gallery with distractors), UCCS-style (split file + linear probe), AR-style (per subset), and
verification over several .bin sets and resolutions."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gdrd_fast import cli, models
from gdrd_fast.data import write_pairs_bin
from gdrd_fast.eval import protocols


class ColourNet(torch.nn.Module):
    """Embedding = mean colour: identities drawn in distinct colours are told apart exactly."""

    def forward(self, x):
        return x.mean((2, 3))


def _colour(k: int) -> tuple[int, int, int]:
    angle = 2 * math.pi * k / 12
    return tuple(int(round(127.5 + 120 * v)) for v in (math.cos(angle), math.sin(angle), -0.5 * math.cos(angle)))


def _image(path, colour, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)


def _tinyface(root):
    for k in (1, 2, 3, 4):
        _image(root / "Testing_Set" / "Probe" / f"{k}_1.png", _colour(k))
        _image(root / "Testing_Set" / "Gallery_Match" / f"{k}_2.png", _colour(k), size=16)
    for n, k in enumerate((6, 7, 8, 9, 1)):   # the last distractor looks exactly like identity 1
        _image(root / "Testing_Set" / "Gallery_Distractor" / f"{n:05d}.png", _colour(k), size=12)
    return root


def test_tinyface_cmc_counts_the_distractors(tmp_path):
    root = _tinyface(tmp_path / "tinyface")
    layout = protocols.read_tinyface(root)
    assert layout.probe_labels.tolist() == [1, 2, 3, 4] and len(layout.distractors) == 5
    result = protocols.tinyface(ColourNet(), root, resolutions=[None], progress=False)
    # probe 1 ties with a distractor (ties count against the probe): rank 2; the others rank 1
    assert result == {"112x112": {1: 0.75, 5: 1.0, 10: 1.0, 20: 1.0}}
    for f in (root / "Testing_Set" / "Gallery_Distractor").iterdir():
        f.unlink()
    assert protocols.tinyface(ColourNet(), root, resolutions=[None], progress=False)["112x112"][1] == 1.0
    (root / "Testing_Set" / "Probe" / "x_1.png").write_bytes((root / "Testing_Set" / "Probe" / "1_1.png").read_bytes())
    with pytest.raises(ValueError, match="x_1.png"):
        protocols.read_tinyface(root)
    with pytest.raises(ValueError, match="Gallery_Match"):
        protocols.read_tinyface(tmp_path)


def _write_list(path, part, names, ids):
    """A TinyFace protocol list as released: a cell array of file names (N x 1) and their identities."""
    savemat = pytest.importorskip("scipy.io").savemat
    key = "probe" if part == "Probe" else "gallery"
    cells = np.empty((len(names), 1), dtype=object)
    cells[:, 0] = names
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {f"{key}_set": cells, f"{key}_ids": np.asarray(ids, dtype=np.float64).reshape(-1, 1)})


def test_tinyface_uses_the_released_lists_where_present(tmp_path):
    testing = _tinyface(tmp_path / "tinyface") / "Testing_Set"
    # names that carry no identity, and a stray image the lists leave out: only the lists decide
    for k, part in ((1, "Probe"), (2, "Gallery_Match")):
        for i in (1, 2, 3, 4):
            (testing / part / f"{i}_{k}.png").rename(testing / part / f"face{i}.png")
    _image(testing / "Probe" / "stray.png", _colour(5))
    _write_list(testing / "probe_img_ID_pairs.mat", "Probe", [f"face{i}.png" for i in (1, 2, 3, 4)], [11, 12, 13, 14])
    eval_kit = tmp_path / "tinyface" / "Face_Identification_Evaluation"  # the evaluation kit's folder also counts
    _write_list(eval_kit / "gallery_match_img_ID_pairs.mat", "Gallery_Match", [f"face{i}.png" for i in (4, 3, 2, 1)],
                [14, 13, 12, 11])
    layout = protocols.read_tinyface(testing)
    assert [p.name for p in layout.probe] == ["face1.png", "face2.png", "face3.png", "face4.png"]
    assert layout.probe_labels.tolist() == [11, 12, 13, 14] and layout.probe_labels.dtype == torch.int64
    assert layout.gallery_labels.tolist() == [14, 13, 12, 11]
    result = protocols.tinyface(ColourNet(), testing, resolutions=[None], progress=False)
    assert result == {"112x112": {1: 0.75, 5: 1.0, 10: 1.0, 20: 1.0}}  # as from the file names


@pytest.mark.parametrize("fault, message", [
    ("missing image", "not in"), ("lengths", "2 file names and 3 identities"), ("fractional id", "integer identities"),
    ("wrong keys", "probe_set"), ("not a mat file", "probe_img_ID_pairs.mat")])
def test_a_bad_tinyface_list_is_refused_by_name(tmp_path, fault, message):
    testing = _tinyface(tmp_path / "tinyface") / "Testing_Set"
    path = testing / "probe_img_ID_pairs.mat"
    names, ids = ["1_1.png", "2_1.png"], [1, 2]
    if fault == "missing image":
        names[1] = "9_1.png"
    elif fault == "lengths":
        ids = [1, 2, 3]
    elif fault == "fractional id":
        ids = [1, 2.5]
    if fault == "wrong keys":
        pytest.importorskip("scipy.io").savemat(path, {"names": np.zeros((2, 1))})
    elif fault == "not a mat file":
        path.write_bytes(b"not MATLAB")
    else:
        _write_list(path, "Probe", names, ids)
    with pytest.raises(ValueError, match=message):
        protocols.read_tinyface(testing)


def _identity_folders(root, members: dict[str, list[int]]):
    for name, colours in members.items():
        for n, k in enumerate(colours):
            _image(root / name / f"{n}.png", _colour(k))


def test_uccs_linear_probe_on_a_split_file(tmp_path):
    _identity_folders(tmp_path / "uccs", {"a": [0, 0, 0], "b": [3, 3, 3], "c": [6, 6], "d": [9, 9]})
    split = tmp_path / "split.txt"
    split.write_text("train a/0.png\ntrain a/1.png\ntrain b/0.png\ntrain b/1.png\ntrain c/0.png\n"
                     "test a/2.png\ntest b/2.png\ntest c/1.png\ntest d/0.png\n")   # d is never trained on
    top1, ranks = protocols.uccs(ColourNet(), tmp_path / "uccs", split, resolutions=[None], progress=False)
    assert top1 == {"112x112": 0.75}                 # the unseen identity counts as an error
    assert ranks["112x112"][1] == 1.0                # CMC over the identities the gallery holds


def test_ar_reports_every_subset(tmp_path):
    root = tmp_path / "ar"
    _identity_folders(root / "gallery", {"m-001": [0], "m-002": [4], "w-001": [8]})
    _identity_folders(root / "scarf", {"m-001": [0], "m-002": [4], "w-001": [4]})   # w-001 looks like m-002
    _identity_folders(root / "sunglasses", {"m-001": [0], "w-001": [8]})
    gallery, subsets, names = protocols.read_ar(root)
    assert names == ["m-001", "m-002", "w-001"] and sorted(subsets) == ["scarf", "sunglasses"]
    assert subsets["sunglasses"].targets.tolist() == [0, 2]   # one label space across folders
    overall, per = protocols.ar(ColourNet(), root, resolutions=[None], progress=False)
    assert per["112x112"]["scarf"] == {"probes": 3, "cmc": {1: 2 / 3, 5: 1.0, 10: 1.0, 20: 1.0}}
    assert per["112x112"]["sunglasses"]["cmc"][1] == 1.0
    assert overall["112x112"][1] == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="gallery/"):
        protocols.read_ar(tmp_path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "student.pt"
    torch.manual_seed(0)
    torch.save(models.get_model("r18").state_dict(), path)
    return path


@pytest.mark.slow
def test_identify_commands_write_reports(tmp_path, weights, capsys):
    root = _tinyface(tmp_path / "tinyface")
    out = tmp_path / "tf"
    assert cli.main(["identify", "tinyface", "--weights", str(weights), "--root", str(root / "Testing_Set"),
                     "--output", str(out), "--batch-size", "8"]) == 0
    payload = json.loads((out / "identification.json").read_text())
    assert set(payload["cmc"]["r18 112x112"]) == {"1", "5", "10", "20"}
    assert all(0 <= v <= 1 for v in payload["cmc"]["r18 112x112"].values())
    ranks = [payload["cmc"]["r18 112x112"][k] for k in ("1", "5", "10", "20")]
    assert ranks == sorted(ranks) and ranks[-1] == 1.0        # 9 gallery images: every probe within rank 20
    assert "| r18 112x112 |" in capsys.readouterr().out
    _identity_folders(tmp_path / "ar", {"gallery/a": [0], "gallery/b": [5], "scarf/a": [0], "scarf/b": [5]})
    assert cli.main(["identify", "ar", "--weights", str(weights), "--root", str(tmp_path / "ar"), "--output",
                     str(tmp_path / "arout"), "--resolutions", "16"]) == 0
    payload = json.loads((tmp_path / "arout" / "identification.json").read_text())
    assert payload["subsets"]["r18 16x16"]["scarf"]["probes"] == 2
    with pytest.raises(SystemExit):
        cli.main(["identify", "uccs", "--weights", str(weights), "--root", str(tmp_path / "ar" / "gallery")])
    assert "--split" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_over_several_sets_and_resolutions(tmp_path, weights, capsys):
    gen = torch.Generator().manual_seed(0)
    sets = []
    for name in ("lfw", "cfp_fp"):
        sets.append(tmp_path / f"{name}.bin")
        write_pairs_bin(sets[-1], torch.rand(20, 3, 56, 56, generator=gen) * 2 - 1, [True, False] * 5)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--weights", str(weights), "--pairs", *map(str, sets), "--resolutions", "8", "16",
                     "--output", str(out), "--batch-size", "20"]) == 0
    payload = json.loads((out / "verification.json").read_text())
    assert {k: sorted(v) for k, v in payload["results"].items()} == {"lfw": ["16x16", "8x8"],
                                                                     "cfp_fp": ["16x16", "8x8"]}
    assert payload["results"]["lfw"]["8x8"]["num_pairs"] == 10 and payload["weights"] == str(weights)
    rows = [line for line in (out / "verification.md").read_text().splitlines() if line.startswith("| lfw")
            or line.startswith("| cfp_fp")]
    assert len(rows) == 4
    assert (out / "accuracy_vs_resolution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one set: its own table and ROC as before, plus the resolution figure
    assert cli.main(["eval", "--weights", str(weights), "--pairs", str(sets[0]), "--resolutions", "16",
                     "--output", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["results"]["r18 16x16"]["accuracy"] == payload["results"]["lfw"]["16x16"]["accuracy"]
    assert (tmp_path / "one" / "roc.png").is_file() and (tmp_path / "one" / "accuracy_vs_resolution.png").is_file()
