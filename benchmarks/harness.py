"""Shared machinery of the benchmarks: synchronised timing, peak extra memory, result metadata.

A benchmark module (benchmarks/test_bench_<op>.py) defines
    SIZES = {"cpu": {key: params, ...}, "cuda": {...}}
    build(provider, size_key, device) -> zero-argument callable running one fwd+bwd step on inputs it owns
and calls `measure(benchmark, __name__, op, provider, size_key, device)` from its test functions.

Memory: on CUDA, max_memory_allocated over one call minus what was allocated before it. On CPU torch
allocations are invisible to tracemalloc, so each case runs once more in a fresh subprocess that reads
its own peak RSS (VmHWM, reset through /proc/self/clear_refs) around one call (performance.md).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EAGER = "eager"  # the provider every ratio is taken against


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes_here(fn, device: str) -> int:
    """Peak memory one call of fn adds on top of what is resident before it, in this process."""
    fn()  # warm-up: compilation, lazy init and allocator pools are not the op's working memory
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def peak_extra_bytes(module: str, provider: str, size_key: str, device: str) -> int:
    if device.startswith("cuda"):
        fn = importlib.import_module(module).build(provider, size_key, device)
        return peak_extra_bytes_here(fn, device)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "benchmarks.harness", module, provider, size_key, device],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {module} {provider} {size_key} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def versions() -> dict:
    from gdrd_fast import backends
    return {"torch": torch.__version__, "triton": backends.triton_version(), "python": platform.python_version()}


def measure(benchmark, module: str, op: str, provider: str, size_key: str, device: str,
            rounds: int = 5, **info) -> None:
    """Time one (op, provider, size) case with pytest-benchmark and record its peak extra memory."""
    fn = importlib.import_module(module).build(provider, size_key, device)
    benchmark.group = f"{op} {size_key} [{device}]"
    benchmark.extra_info.update(op=op, provider=provider, size=size_key, device=device_name(device),
                                peak_extra_bytes=peak_extra_bytes(module, provider, size_key, device),
                                **versions(), **info)

    def step():
        fn()
        sync(device)

    step()
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


if __name__ == "__main__":  # memory probe: python -m benchmarks.harness MODULE PROVIDER SIZE DEVICE
    _module, _provider, _size, _device = sys.argv[1:5]
    _fn = importlib.import_module(_module).build(_provider, _size, _device)
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes_here(_fn, _device)}))
