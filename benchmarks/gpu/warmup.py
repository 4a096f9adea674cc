"""The Triton warm-up of the GPU run: every shipped Triton configuration compiled before the tests, in
parallel, into the one Triton cache (TRITON_CACHE_DIR) that the tests then read.

    python -m benchmarks.gpu.warmup [--jobs N] [--arch 90] [--report FILE.json]

The configurations are each kernel module's STATIC_CONFIGS for the installed Triton (the ones
tests/lib/test_triton_static.py checks, kernels/_tiles.py). Each is compiled through the kernel's own
`JITFunction.warmup`, the path of a real launch, so its cache key is the one a launch computes: for
16-byte-aligned tensors (every torch allocation), with its integer arguments once as multiples of 16 and
once not (Triton specialises on that; arguments equal to 1 are not warmed up). On a machine without a GPU
(the CPU rehearsal) a stand-in driver names the target (sm_<arch>): Triton then compiles for it as it would
there, without launching anything.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import time
from concurrent.futures import ProcessPoolExecutor

# integer arguments: a multiple of 16 ("D": tt.divisibility 16) and not one; both as common as the shapes
INT_VARIANTS = {"multiple of 16": 16, "not a multiple of 16": 17}


def shipped_configs(arch: int) -> list:
    """Every STATIC_CONFIGS entry of the kernel modules that the launchers may pick on sm_<arch>."""
    from gdrd_fast import backends
    kernels = backends.kernels()
    modules = [importlib.import_module(f"gdrd_fast.kernels.{info.name}")
               for info in pkgutil.iter_modules(kernels.__path__) if not info.name.startswith("_")]
    return [config for module in modules for config in getattr(module, "STATIC_CONFIGS", [])
            if arch in config.archs]


class _TargetOnly:
    """Stands in for Triton's CUDA driver where there is no GPU: what `JITFunction.warmup` asks of it, the
    device, its stream and its target. Nothing is launched, so nothing else is needed."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _use_target(arch: int) -> None:
    import torch
    from triton.runtime import driver
    if not torch.cuda.is_available():
        driver.set_active(_TargetOnly(arch))


def _arguments(config, integer: int) -> list:
    """One argument per runtime parameter: a dtype for a tensor (Triton's warmup mocks an aligned one)."""
    import torch
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i64": torch.int64,
              "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "i1": torch.bool}
    args = []
    for name in config.fn.arg_names:
        if name in config.constexprs:
            continue
        kind = config.signature[name]
        if kind.startswith("*"):
            args.append(dtypes[kind[1:]])
        elif kind.startswith("fp"):
            args.append(0.5)
        else:
            args.append(integer)
    return args


def _compile(task: tuple[int, int, str]) -> tuple[str, str, float, str]:
    """(config name, integer variant, seconds, error or "") for one configuration, in a worker process."""
    arch, index, variant = task
    _use_target(arch)
    config = shipped_configs(arch)[index]
    start = time.perf_counter()
    try:
        config.fn.warmup(*_arguments(config, INT_VARIANTS[variant]), grid=(1,), num_warps=config.num_warps,
                         num_stages=config.num_stages, **config.constexprs)
        error = ""
    except Exception as exc:  # reported, and the other configurations still compile
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return config.name, variant, time.perf_counter() - start, error


def warm_up(arch: int, jobs: int) -> dict:
    configs = shipped_configs(arch)
    tasks = [(arch, i, variant) for i in range(len(configs)) for variant in INT_VARIANTS]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(_compile, tasks))
    seconds = time.perf_counter() - start
    failed = [f"{name} ({variant}): {error}" for name, variant, _, error in done if error]
    return {"arch": arch, "jobs": jobs, "configurations": len(configs), "compilations": len(tasks),
            "seconds": round(seconds, 1), "cpu_seconds": round(sum(s for _, _, s, _ in done), 1),
            "load_average": os.getloadavg(), "cache": os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"),
            "failed": failed}


def _device_arch() -> int:
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes (default: one per core)")
    parser.add_argument("--arch", type=int, help="compute capability x 10 (default: the GPU's, else 90)")
    parser.add_argument("--report", help="also write the summary here as JSON")
    args = parser.parse_args(argv)
    result = warm_up(args.arch or _device_arch(), args.jobs)
    print(f"Triton warm-up: {result['configurations']} configurations x {len(INT_VARIANTS)} integer variants "
          f"compiled for sm_{result['arch']} in {result['seconds']} s by {result['jobs']} processes "
          f"({result['cpu_seconds']} s of compilation; load average before the end "
          f"{', '.join(f'{x:.2f}' for x in result['load_average'])}), cache {result['cache']}")
    for line in result["failed"]:
        print(f"  FAILED {line}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
