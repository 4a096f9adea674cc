"""Shared machinery of the benchmarks: synchronised timing, peak extra memory, result metadata.

A benchmark module (benchmarks/test_bench_<op>.py) defines
    SIZES = {"cpu": {key: params, ...}, "cuda": {...}}
    build(provider, size_key, device) -> zero-argument callable running one fwd+bwd step on inputs it owns
and calls `measure(benchmark, __name__, op, provider, size_key, device)` from its test functions.

Time: on CPU, pytest-benchmark's rounds (host clock). On CUDA, triton.testing.do_bench (CUDA events, L2
flushed before every call): its median, p20 and p80 go to extra_info as median_s / p20_s / p80_s and are
the numbers the reports use (docs/performance/measuring.md); a few host-timed rounds still run for
pytest-benchmark's own table. `median_seconds` reads whichever a result has.

Memory: on CUDA, max_memory_allocated over one call minus what was allocated before it. On CPU torch
allocations are invisible to tracemalloc, so each case runs once more in a fresh subprocess that reads
its own peak RSS (VmHWM, reset through /proc/self/clear_refs) around one call (docs/performance/measuring.md).

Host time (CUDA only): host_s, the host's time to issue one call (host_seconds), next to the CUDA time.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

# the folder holding the top-level package of this one: the repository (benchmarks) or site-packages
# (gdrd_fast.benchmarks, as installed); the memory probe runs `python -m <package>.harness` from there
PACKAGE = __spec__.parent if __spec__ is not None and __spec__.parent else "benchmarks"
_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(_HERE, *[os.pardir] * (PACKAGE.count(".") + 1)))
EAGER = "eager"  # the provider every ratio is taken against
# Peak extra memory below this is not resolved: CPU RSS moves by pages and allocator pools, so a
# provider measured under it counts as this much, and its ratio against eager is a lower bound (">=").
MEMORY_RESOLUTION = 2 ** 20


def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cases(sizes: dict, providers) -> list:
    """pytest params (provider, size_key, device) for this machine; providers: a list or device -> list."""
    device = bench_device()
    names = providers(device) if callable(providers) else providers
    return [pytest.param(p, s, device, id=f"{s}-{p}") for s in sizes[device] for p in names]


def skip_unavailable(impls: dict, backend: str, device: str) -> None:
    """Skip (with the reason) a gdrd_fast backend this build or device cannot run."""
    if backend in impls:
        reason = impls[backend].unavailable(torch.device(device))
        if reason:
            pytest.skip(reason)


def random_relational_params(embed: int, rel_dim: int, device, generator):
    """CRRCD's parameters at a fresh head's scale, float32 with grad (as under autocast): weights
    N(0, 1 / fan_in), biases N(0, 0.01)."""
    from gdrd_fast.params import RelationalParams, relational_param_shapes

    def draw(shape):
        t = torch.randn(*shape, device=device, generator=generator)
        return (t / shape[1] ** 0.5 if len(shape) == 2 else 0.1 * t).requires_grad_(True)

    return RelationalParams(**{k: draw(s) for k, s in relational_param_shapes(embed, rel_dim).items()})


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
    # a fixed mmap threshold and no trim threshold make glibc hand freed buffers back to the OS at once,
    # so what the warm-up call freed cannot hide inside the heap when the measured call reuses it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-m", f"{PACKAGE}.harness", module, provider, size_key, device],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {module} {provider} {size_key} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def versions() -> dict:
    from gdrd_fast import backends
    return {"torch": torch.__version__, "triton": backends.triton_version(), "python": platform.python_version()}


def median_seconds(bench) -> float:
    """A result's median time: do_bench's on CUDA, else pytest-benchmark's (a Metadata object or its JSON)."""
    info = bench["extra_info"] if isinstance(bench, dict) else bench.extra_info
    if "median_s" in info:
        return info["median_s"]
    return bench["stats"]["median"] if isinstance(bench, dict) else bench.stats.median


def memory_ratio(eager_bytes: int | None, provider_bytes: int | None) -> float | None:
    """Eager's peak extra memory over a provider's, both floored at MEMORY_RESOLUTION; None where eager is
    itself below it (both are then noise) or either is missing."""
    if eager_bytes is None or provider_bytes is None or eager_bytes < MEMORY_RESOLUTION:
        return None
    return eager_bytes / max(provider_bytes, MEMORY_RESOLUTION)


def memory_ratio_text(eager_bytes: int | None, provider_bytes: int | None) -> str:
    """memory_ratio as a table cell: '-', '2.50x', or '>=400x' where the provider is below the resolution."""
    ratio = memory_ratio(eager_bytes, provider_bytes)
    if ratio is None:
        return "-"
    return f">={ratio:.0f}x" if provider_bytes < MEMORY_RESOLUTION else f"{ratio:.2f}x"


def memory_mb_text(nbytes: int | None) -> str:
    """Peak extra memory as a table cell in MiB: '-', '<1' below the resolution, else one decimal."""
    if nbytes is None:
        return "-"
    return f"<{MEMORY_RESOLUTION / 2**20:g}" if nbytes < MEMORY_RESOLUTION else f"{nbytes / 2**20:.1f}"


def host_seconds(fn, device: str, calls: int = 20) -> float:
    """Host time of one call: `calls` issued back to back after a warm-up, synchronised only at the end. On a
    GPU, set beside the CUDA time it shows which of the two bounds the call (a call that syncs shows both)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed / calls


def measure(benchmark, module: str, op: str, provider: str, size_key: str, device: str,
            rounds: int = 5, memory: bool = True, **info) -> None:
    """Time one (op, provider, size) case and (memory=True) record its peak extra memory."""
    fn = importlib.import_module(module).build(provider, size_key, device)
    benchmark.group = f"{op} {size_key} [{device}]"
    if memory:
        info["peak_extra_bytes"] = peak_extra_bytes(module, provider, size_key, device)
    if device.startswith("cuda"):
        info["host_s"] = host_seconds(fn, device)
    benchmark.extra_info.update(op=op, provider=provider, size=size_key, device=device_name(device),
                                **versions(), **info)

    def step():
        fn()
        sync(device)

    step()
    if device.startswith("cuda"):
        from triton.testing import do_bench
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])  # milliseconds, cold L2
        benchmark.extra_info.update(timer="triton.testing.do_bench, L2 flushed", median_s=median / 1e3,
                                    p20_s=p20 / 1e3, p80_s=p80 / 1e3)
        rounds = min(rounds, 3)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


if __name__ == "__main__":  # memory probe: python -m <package>.harness MODULE PROVIDER SIZE DEVICE
    _module, _provider, _size, _device = sys.argv[1:5]
    _fn = importlib.import_module(_module).build(_provider, _size, _device)
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes_here(_fn, _device)}))
