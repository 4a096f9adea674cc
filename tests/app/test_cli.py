"""The gdrd-fast command: every subcommand has --help, recipes resolve, and every failure is one line on
stderr with a non-zero exit code, never a traceback."""
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gdrd_fast import cli, models
from gdrd_fast.train import save_checkpoint


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


ROOT = Path(__file__).resolve().parents[2]


def test_bench_passes_arguments_to_pytest(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.chdir(tmp_path)  # the benchmarks are found from the package, not the working directory
    assert cli.main(["bench", "--", "-k", "infonce", "--benchmark-json=out.json"]) == 0
    assert calls == [[sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "-p",
                      "no:cacheprovider", "-k", "infonce", "--benchmark-json=out.json"]]


@pytest.mark.parametrize("layout", ["checkout", "installed"])
def test_bench_collects_from_another_directory(layout, tmp_path):
    """From a source checkout, or installed with the benchmarks shipped as gdrd_fast.benchmarks."""
    site = ROOT
    if layout == "installed":
        site = tmp_path / "site-packages"
        ignore = shutil.ignore_patterns("__pycache__", "results")
        shutil.copytree(ROOT / "gdrd_fast", site / "gdrd_fast", ignore=ignore)
        shutil.copytree(ROOT / "kernels", site / "gdrd_fast" / "kernels", ignore=ignore)
        shutil.copytree(ROOT / "benchmarks", site / "gdrd_fast" / "benchmarks", ignore=ignore)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-m", "gdrd_fast", "bench", "--", "--collect-only", "-q",
                          "-k", "bank_update"], check=False, capture_output=True, text=True, cwd=work, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "test_bench_bank_update.py::" in out.stdout


def _one_error_line(capsys, exit_info, code=2) -> str:
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _write_pairs(path):
    from gdrd_fast.data import write_pairs_bin
    write_pairs_bin(path, torch.zeros(4, 3, 8, 8), [True, False])
    return path


def test_eval_missing_weights_is_one_line(capsys, tmp_path):
    pairs = _write_pairs(tmp_path / "lfw.bin")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--weights", "/nonexistent/student.pt", "--pairs", str(pairs)])
    line = _one_error_line(capsys, exit_info)
    assert line.startswith("gdrd-fast eval: error:") and "--weights" in line and "/nonexistent/student.pt" in line


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 3, bytes(range(256)) * 8])
def test_eval_non_checkpoint_weights_is_one_line(content, capsys, tmp_path):
    weights = tmp_path / "student.pt"
    weights.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--weights", str(weights), "--pairs", str(_write_pairs(tmp_path / "lfw.bin"))])
    line = _one_error_line(capsys, exit_info)
    assert str(weights) in line and "corrupt" in line and "weights_only" not in line


def test_eval_corrupt_pairs_is_one_line(capsys, tmp_path):
    weights = tmp_path / "student.pt"
    save_checkpoint(models.get_model("r18").state_dict(), weights)
    pairs = _write_pairs(tmp_path / "lfw.bin")
    pairs.write_bytes(pairs.read_bytes()[:-40])  # truncated
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--weights", str(weights), "--pairs", str(pairs)])
    assert str(pairs) in _one_error_line(capsys, exit_info)


def test_missing_optional_package_fails_before_any_training(monkeypatch, capsys, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers"
                        else real_find_spec(name, *a))
    monkeypatch.setattr("gdrd_fast.demo.run_demo", lambda *a, **k: pytest.fail("the demo started without diffusers"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick", "--output", str(tmp_path)])
    line = _one_error_line(capsys, exit_info)
    assert "diffusers" in line and "pip install" in line


@pytest.mark.parametrize("argv, usage", [
    (["train", "--bogus"], "usage: gdrd-fast train"),
    (["eval", "--weights", "w", "--pairs", "p", "--nope"], "usage: gdrd-fast eval"),
    (["demo", "--quick", "extra"], "usage: gdrd-fast demo"),
])
def test_unknown_arguments_show_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and f"error: unrecognized arguments: {argv[-1]}" in err
    assert "{train,eval" not in err  # not the top-level usage


@pytest.mark.diffusers
def test_quick_demo_writes_to_its_own_folder(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_run_demo(output, config, **kwargs):
        seen.append((Path(output), config.smoke))
        return {"note": "", "table": "", "text": "", "paths": {}}

    monkeypatch.setattr("gdrd_fast.demo.run_demo", fake_run_demo)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--quick"]) == 0 and cli.main(["demo", "--set", "teacher.steps=1"]) == 0
    assert seen == [(Path("demo_output_quick"), True), (Path("demo_output"), False)]


def test_unexpected_failures_and_interrupts_are_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(cli, "_env", boom)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["env"])
    line = _one_error_line(capsys, exit_info, code=1)
    assert "RuntimeError: kernel exploded second line" in line and "GDRD_FAST_DEBUG=1" in line

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_env", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["env"])
    assert _one_error_line(capsys, exit_info, code=130) == "gdrd-fast env: interrupted"
    # the process exits from here: further signals are ignored, not raised into the exit
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_console_failure_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("GDRD_FAST_DEBUG", None)
    out = subprocess.run([sys.executable, "-m", "gdrd_fast", "eval", "--weights", "/nonexistent", "--pairs",
                          "/nonexistent.bin"], check=False, capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["gdrd-fast eval: error: --weights: no file at '/nonexistent'"]


def test_bench_without_benchmarks_is_one_line(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--path", str(tmp_path / "missing")])
    assert "--path: no benchmark file or folder" in _one_error_line(capsys, exit_info)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "gdrd_fast" / "cli.py"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench"])
    assert "ships without them" in _one_error_line(capsys, exit_info)


def test_eval_of_a_training_checkpoint_points_to_the_students_weights(capsys, tmp_path):
    pairs = _write_pairs(tmp_path / "lfw.bin")
    stage2 = tmp_path / "run" / "stage2.pt"
    save_checkpoint({"stage": "stage2", "step": 3, "modules": {"x": torch.zeros(1)}, "meta": {}}, stage2)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--weights", str(stage2), "--pairs", str(pairs)])
    line = _one_error_line(capsys, exit_info)
    assert "training checkpoint" in line and str(tmp_path / "run" / "student.pt") in line
    assert str(tmp_path / "run" / "best.pt") in line


def test_the_decode_bar_ends_at_every_image(monkeypatch, tmp_path):
    from gdrd_fast.data import load_pairs_bin, pairs_bin
    bars = []

    def recording_tqdm(*args, **kwargs):
        bars.append(pairs_bin.tqdm.__wrapped__(*args, **kwargs))
        return bars[-1]

    recording_tqdm.__wrapped__ = pairs_bin.tqdm
    monkeypatch.setattr(pairs_bin, "tqdm", recording_tqdm)
    images, _ = load_pairs_bin(_write_pairs(tmp_path / "lfw.bin"), progress=True)
    assert len(images) == 4 and [(bar.n, bar.total) for bar in bars] == [(4, 4)]
