"""Worker processes that stop with the grid: one Ctrl-C or SIGTERM to the main process stops them all.

Each worker is a fresh Python process in a session (and process group) of its own, so the terminal's
Ctrl-C reaches only the main process, which then stops every worker's group itself: SIGTERM, then SIGKILL
after a short grace. PR_SET_PDEATHSIG makes the kernel kill a worker whose parent died without that chance
(kill -9). Tasks are named "module:function" and called as function(spec, report); report(**progress)
sends a progress message to the main process. The main process imports nothing of the workers' code.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

PR_SET_PDEATHSIG = 1  # linux/prctl.h
GRACE_S = 3.0  # how long a stopped worker may take to exit on SIGTERM before it is killed


class WorkerFailed(RuntimeError):
    """A worker process died without reporting (killed, out of memory)."""


class Pool:
    """`jobs` worker processes; `run(tasks, on_progress, on_done)` hands each (key, task, spec) to a free one."""

    def __init__(self, jobs: int, threads: int = 1):
        self.workers: list[_Worker] = []
        try:
            for _ in range(jobs):
                self.workers.append(_Worker(threads))
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(kill=exc[0] is not None)

    def run(self, tasks: list[tuple], on_done: Callable[[object, object], list[tuple] | None],
            on_progress: Callable[[int, object, dict], None] | None = None,
            order: Callable[[list[tuple]], list[tuple]] | None = None) -> None:
        """Run every (key, "module:function", spec); on_done(key, result) may return more tasks to queue.
        on_progress(worker index, key, progress) is called with what a task reports. order(queue), when
        given, reorders the queue whenever tasks join it (the next free worker takes its first). A task's
        exception is raised here (the other workers are then stopped by the caller's `with`)."""
        queue, busy = list(tasks), {}
        while queue or busy:
            for worker in self.workers:
                if queue and worker not in busy:
                    key, task, spec = queue.pop(0)
                    worker.send((task, spec))
                    busy[worker] = key
            ready = wait([fd for w in busy for fd in w.waitables], timeout=1.0)
            for worker in list(busy):
                if not any(fd in ready for fd in worker.waitables):
                    continue
                try:
                    kind, payload = worker.inbox.recv()
                except EOFError:
                    raise WorkerFailed(f"a grid process (pid {worker.process.pid}) died while running "
                                       f"{busy[worker]} (exit code {worker.process.poll()})") from None
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(self.workers.index(worker), busy[worker], payload)
                    continue
                key = busy.pop(worker)
                if kind == "error":
                    raise payload
                more = on_done(key, payload) or []
                queue += more
                if more and order is not None:
                    queue = order(queue)

    def stop(self, kill: bool = False) -> None:
        """End the workers: asked to finish (kill=False) or stopped by signal; none is left running."""
        if not kill:
            for worker in self.workers:
                worker.send(None)
        deadline = time.monotonic() + (30.0 if not kill else GRACE_S)
        try:
            if kill:
                for worker in self.workers:
                    worker.signal(signal.SIGTERM)
            for worker in self.workers:
                worker.wait(deadline)
        finally:  # also after a second Ctrl-C during the grace: kill at once
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
                worker.process.wait()
                worker.close()


class _Worker:
    def __init__(self, threads: int):
        down_read, down_write = os.pipe()  # main -> worker
        up_read, up_write = os.pipe()  # worker -> main
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", f"from {__name__} import serve; serve()", str(down_read), str(up_write),
                 str(os.getpid())],
                pass_fds=(down_read, up_write), start_new_session=True, env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(down_read)
            os.close(up_write)
        self.outbox, self.inbox = Connection(down_write, readable=False), Connection(up_read, writable=False)
        # readable when the worker exits, even if a process it started still holds its end of the pipe
        self.exit_fd = os.pidfd_open(self.process.pid) if hasattr(os, "pidfd_open") else None
        self.waitables = [self.inbox] + ([self.exit_fd] if self.exit_fd is not None else [])

    def send(self, message) -> None:
        try:
            self.outbox.send(message)
        except (BrokenPipeError, OSError):
            pass  # it has exited; its sentinel reports that

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)  # its group: whatever it started goes too
            except ProcessLookupError:
                pass

    def wait(self, deadline: float) -> None:
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self.outbox.close()
        self.inbox.close()
        if self.exit_fd is not None:
            os.close(self.exit_fd)


def step_reporter(report: Callable[..., None], offset: int, total: int, every_s: float = 0.5) -> Callable:
    """A Trainer step hook that reports a task's progress (offset + the trainer's step, of total steps) at most
    every every_s seconds, and at the trainer's last step."""
    last = [0.0]

    def hook(trainer, terms) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or trainer.step == trainer.total_steps:
            last[0] = now
            report(stage=trainer.name, step=offset + trainer.step, total=total)
    return hook


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux); exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the main process's own stop() is the only guard
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def serve() -> None:
    """A worker's main (argv: its two pipe ends and the main process's pid): run tasks until told to stop
    (None) or the main process goes away (EOF)."""
    down, up, parent = (int(a) for a in sys.argv[1:4])
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when a worker stops
    inbox, outbox = Connection(down, writable=False), Connection(up, readable=False)

    def report(**progress) -> None:
        outbox.send(("progress", progress))

    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        task, spec = message
        module, function = task.split(":")
        try:
            result = ("done", getattr(importlib.import_module(module), function)(spec, report))
        except Exception as exc:  # sent to the main process, which raises it
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            result = ("error", exc)
        outbox.send(result)

