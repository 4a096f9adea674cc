"""`gdrd-fast train` killed, interrupted and starved of disk: a tiny two-stage run with validation,
stopped at moments drawn with a fixed seed and resumed, ends with the files and rows of an
uninterrupted run; Ctrl-C and SIGTERM checkpoint the last step and leave no process; a full disk is
one line naming the checkpoint."""
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

import fault_cases as fc
from gdrd_fast.train import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.diffusers]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    inputs = fc.make_inputs(root)
    started = time.monotonic()
    done = fc.run(fc.overrides(inputs, root / "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"inputs": inputs, "seconds": time.monotonic() - started, "outcome": fc.outcome(root / "reference"),
            "stderr": done.stderr, "log": (root / "reference" / "train.log").read_text()}


def survivors(pgid: int) -> list[int]:
    """Processes of the run's session that still exist (zombies aside)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def log_lines(out: Path, text: str) -> int:
    log = out / "train.log"
    return log.read_text().count(text) if log.is_file() else 0


def test_progress_bar_and_log_report_the_same_samples_per_second(reference):
    bar = [line.rsplit("samples/s=", 1)[1].split("]")[0] for line in reference["stderr"].split("\r")
           if "stage2" in line and "samples/s=" in line]
    logged = [line.split("samples/s ")[1].split()[0] for line in reference["log"].splitlines()
              if "stage2 step" in line and "samples/s " in line]
    assert bar and bar[-1] == logged[-1] and float(logged[-1]) > 0


def test_kills_at_random_moments_then_resume_give_the_uninterrupted_run(reference, tmp_path):
    """SIGKILL during a checkpoint write, at random moments, during validation, and a Ctrl-C; each
    followed by --resume from the last checkpoint (a fresh start where none exists yet)."""
    rng = random.Random(24)
    out, inputs, seconds = tmp_path / "run", reference["inputs"], reference["seconds"]
    moments = [("checkpoint write", lambda: any(out.glob(".stage*.pt.tmp-*"))),
               ("random", rng.uniform(0.2, 0.8) * seconds),
               ("Ctrl-C", lambda: log_lines(out, " lr ") > steps_logged),
               ("validation", lambda: log_lines(out, "stage2 step 2/4") > seen),
               ("random", rng.uniform(0.2, 0.8) * seconds)]
    stopped = []
    for what, moment in moments:
        seen, steps_logged = log_lines(out, "stage2 step 2/4"), log_lines(out, " lr ")
        resume = fc.latest_checkpoint(out)
        proc = fc.start(fc.overrides(inputs, out) + (["--resume", str(resume)] if resume else []))
        started = time.monotonic()
        reached = fc.wait_for(moment if callable(moment) else lambda started=started, moment=moment: time.monotonic() - started > moment,
                              proc)
        if not reached or proc.poll() is not None:  # the run got past that moment's place, or finished
            proc.communicate(timeout=600)
            continue
        if what == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)  # a terminal sends it to every process of the job
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 130, err[-3000:]
            assert "stopped after step" in err.strip().splitlines()[-1] and "--resume" in err
        else:
            fc.kill_group(proc)
            proc.communicate(timeout=60)
        assert not survivors(proc.pid)
        stopped.append(what)
    assert len(stopped) >= 3, stopped  # most moments come before the run's end
    resume = fc.latest_checkpoint(out)
    done = fc.run(fc.overrides(inputs, out) + (["--resume", str(resume)] if resume else []))
    assert done.returncode == 0, done.stderr[-3000:]
    assert fc.differences(fc.outcome(out), reference["outcome"]) == []
    assert "resumed from" in (out / "train.log").read_text()


def test_sigterm_checkpoints_the_last_step_and_no_worker_survives(reference, tmp_path):
    out, inputs = tmp_path / "run", reference["inputs"]
    args = fc.overrides(inputs, out, "variant=stage1-probe", "data.num_workers=2", "checkpoint_every=0",
                        "stage1.optim.steps=20")
    proc = fc.start(args)
    assert fc.wait_for(lambda: log_lines(out, "stage1 step 2/20") == 1, proc)
    os.kill(proc.pid, signal.SIGTERM)  # the main process only, as a scheduler may
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    step = load_checkpoint(out / "stage1.pt")["step"]
    assert 2 <= step < 20 and f"stopped after step {step}" in err.strip().splitlines()[-1]
    assert not survivors(proc.pid)

    # a second Ctrl-C stops at once, before the step under way ends, and keeps the last checkpoint
    proc = fc.start(args + ["--resume", str(out / "stage1.pt")])
    assert fc.wait_for(lambda: log_lines(out, f"stage1 step {step + 1}/20") == 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    if "gdrd-fast train: interrupted: stopped at once by SIGINT" not in err:
        # on a busy machine the step can end within the 0.3 s: then the first signal's stop is what ran,
        # and the second, ignored while the run exits, must not have turned it into a death by signal
        assert "stopped after step" in err.strip().splitlines()[-1], err[-3000:]
    assert load_checkpoint(out / "stage1.pt")["step"] >= step
    assert not survivors(proc.pid)


@pytest.fixture
def small_tmpfs(tmp_path):
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the ulimit -f case runs anyway)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))


@pytest.mark.parametrize("limit", ["tmpfs", "ulimit -f"])
def test_a_full_disk_is_one_line_naming_the_checkpoint(reference, tmp_path, request, limit):
    """stage1.pt (about 23 MB) fits in 64 MB, stage2.pt (about 280 MB) does not."""
    out = (request.getfixturevalue("small_tmpfs") if limit == "tmpfs" else tmp_path) / "run"
    args = fc.overrides(reference["inputs"], out, "stage1.optim.steps=1", "stage2.optim.steps=1",
                        "checkpoint_every=1", "eval.val_targets=[]")
    done = fc.run(args, preexec_fn=_limit_file_size if limit == "ulimit -f" else None)
    reason = "the disk is full" if limit == "tmpfs" else "larger than this process may write"
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-3000:]
    assert last.startswith(f"gdrd-fast train: error: could not write {out / 'stage2.pt'}: ") and reason in last
    assert load_checkpoint(out / "stage1.pt")["step"] == 1  # what was saved before stays readable
    assert sorted(p.name for p in out.iterdir()) == ["losses.csv", "stage1.pt", "teachers.json", "train.log"]
