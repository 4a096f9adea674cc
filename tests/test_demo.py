"""The offline demo, --quick: every output is written and says what data it measured."""
import json

import pytest

from gdrd_fast import cli
from gdrd_fast.data import write_synthetic_dataset
from gdrd_fast.demo import load_demo_config, run_demo

PHASES = ["HR teacher", "denoiser", "GDRD stage 1", "GDRD stage 2", "LR baseline", "LR CRD"]


def _check_outputs(out, marker):
    for name in ("results.md", "results.json", "demo.log"):
        assert marker in (out / name).read_text(), f"{name} does not say {marker!r}"
    for name in ("roc.png", "training.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "results.json").read_text())


def test_quick_demo_on_synthetic_faces(tmp_path):
    config = load_demo_config(quick=True)
    result = run_demo(tmp_path, config, progress=False)
    payload = _check_outputs(tmp_path, "SYNTHETIC")
    assert payload["synthetic"] is True
    names = list(payload["results"])
    assert names[0].startswith("HR teacher") and any("GDRD" in n for n in names)
    assert any("baseline" in n for n in names) and any("CRD" in n and "GDRD" not in n for n in names)
    pairs = 10 * config.data.pairs_per_fold
    for res in payload["results"].values():
        assert 0.0 <= res["accuracy"] <= 1.0 and res["num_pairs"] == pairs
    for name in names:  # the Markdown table shows every measured row
        assert name in result["table"]
    assert list(payload["timings_s"])[:-1] == PHASES
    log = (tmp_path / "demo.log").read_text()
    assert "GDRD stage 2 step" in log and "rcd" in log


def test_quick_demo_on_a_real_folder_and_bin(tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "data", num_train_identities=12, images_per_identity=6,
                                   num_test_identities=20, test_images_per_identity=3, pairs_per_fold=4,
                                   image_size=48)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out), "--train-root", str(data["train"]),
                     "--pairs", str(data["pairs"])]) == 0
    payload = _check_outputs(out, "real data")
    assert payload["synthetic"] is False and str(data["pairs"]) in payload["dataset"]
    assert "real data" in capsys.readouterr().out


def test_demo_recipe_budget_is_equal_for_every_student():
    config = load_demo_config()
    assert config.student_budget.steps == config.stage1.steps + config.stage2.optim.steps
    with pytest.raises(ValueError, match="unknown config key"):
        load_demo_config(overrides=["stage2.rcd.negatives=3"])
