"""The gdrd-fast command: every subcommand has --help, recipes resolve, bad input exits cleanly."""
import subprocess
import sys

import pytest
import yaml

from gdrd_fast import cli


@pytest.mark.parametrize("command, expected", [("train", "--resume"), ("eval", "--pairs"), ("bench", "pytest"),
                                               ("demo", "--quick"), ("env", "usage")])
def test_every_subcommand_has_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_console_entry_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "gdrd_fast", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "bench", "demo", "env"):
        assert command in out.stdout


def test_train_prints_the_resolved_recipe_with_overrides(capsys):
    assert cli.main(["train", "--config", "paper", "--set", "data.batch_size=8", "--set", "stage2.distill=crd",
                     "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["batch_size"] == 8 and config["stage2"]["distill"] == "crd"
    assert config["stage1"]["optim"]["milestones"] == [21, 28, 32]


@pytest.mark.parametrize("override, message", [("data.batchsize=8", "data.batchsize"),
                                               ("data.batch_size=eight", "data.batch_size"),
                                               ("stage2.distill=mse", "stage2.distill"),
                                               ("amp=fp8", "amp")])
def test_bad_overrides_exit_with_the_key_named(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--set", override, "--print-config"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_lists_the_packaged_ones(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", "nope", "--print-config"])
    err = capsys.readouterr().err
    assert "demo" in err and "paper" in err


def test_train_without_data_root_says_so(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--set", f"output_dir={tmp_path}"])
    assert exit_info.value.code == 2 and "data.train_root" in capsys.readouterr().err


def test_bench_passes_arguments_to_pytest(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["bench", "--", "-k", "infonce", "--benchmark-json=out.json"]) == 0
    assert calls == [[sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-k", "infonce",
                      "--benchmark-json=out.json"]]


def test_demo_rejects_half_a_real_dataset(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick", "--output", str(tmp_path), "--train-root", str(tmp_path)])
    assert exit_info.value.code == 2 and "pairs" in capsys.readouterr().err
