"""One Ctrl-C (SIGINT) or SIGTERM to the main process stops the demo's grid and `ablate` with every process
they started, within seconds: exit 130 or 143, and no process of the run survives."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# cells long enough to be running when the signal comes; the teachers stay at --quick's few steps
ENDLESS = ["--set", "stage1.steps=100000", "--set", "stage2.optim.steps=100000", "--set", "teacher.steps=1",
           "--set", "denoiser.optim.steps=1"]
COMMANDS = {"demo": ["demo", "--quick", "--jobs", "2", "--no-progress", *ENDLESS],
            "ablate": ["ablate", "--quick", "--variants", "baseline", "gdrd", "--seeds", "1", "--jobs", "2",
                       "--no-progress", *ENDLESS]}


def descendants(pid: int) -> set[int]:
    """Every live process below pid (from /proc: parent links)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.diffusers
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.parametrize("command, signum, code", [("demo", signal.SIGINT, 130), ("demo", signal.SIGTERM, 143),
                                                   ("ablate", signal.SIGINT, 130), ("ablate", signal.SIGTERM, 143)])
def test_a_signal_stops_the_grid_and_every_worker(command, signum, code, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    main = subprocess.Popen([sys.executable, "-m", "gdrd_fast", *COMMANDS[command], "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        workers = set()
        # both grid workers are training their cells: their checkpoints' folder and log exist
        while len(list((out / "cells").glob("*/train.log"))) < 2 or len(workers) < 2:
            assert main.poll() is None, f"{command} ended before the signal: {main.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the grid's workers did not start in time"
            time.sleep(0.5)
            workers = descendants(main.pid)
        time.sleep(1.0)
        tree = descendants(main.pid)
        main.send_signal(signum)
        start = time.monotonic()
        _, err = main.communicate(timeout=30)
        stopped_in = time.monotonic() - start
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
    assert main.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1] == f"gdrd-fast {command}: interrupted" + (": SIGTERM" if code == 143 else "")
    assert stopped_in < 15
    time.sleep(1.0)  # an orphan would be reparented, still alive
    survivors = [pid for pid in tree if alive(pid)]
    assert not survivors, f"processes of the run still alive after {command} ended: {survivors}"


def test_a_second_signal_stops_at_once():
    """In-process, so the order is certain: the first SIGINT asks for a stop after the step, the second
    raises StopRequested inside the step; a block left without a signal restores the handlers."""
    from gdrd_fast.train import signals
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(signals.StopRequested, match="stopped at once by SIGINT") as stop:
        with signals.stop_gracefully():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert signals.requested() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the step under way: the second signal ends it
    assert stop.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is before
