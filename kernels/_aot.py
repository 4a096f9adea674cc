"""Ahead-of-time compilation of Triton kernels for a GPU that is not here (docs/performance/measuring.md).

`compile_config(config, arch)` lowers one shipped kernel configuration to PTX for sm_90 or sm_80 with
triton.compile(target=GPUTarget(...)), assembles it with the ptxas that Triton bundles and reports
registers, spill bytes, shared memory and whether the PTX uses wgmma (Hopper tensor-core MMA).

Each kernel module exposes STATIC_CONFIGS: a list of dicts
    {"name": str, "fn": @triton.jit kernel, "signature": {arg: "*bf16" | "i32" | "fp32" | ...},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int, "expect_wgmma": bool,
     "arch": 90 or 80 (optional: a configuration picked only for that architecture; default both)}
covering every configuration it can launch; tests/test_triton_static.py checks them all.
expect_wgmma is checked on sm_90 only (sm_80 has no wgmma).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
PTXAS_ARCH = {90: "sm_90a", 80: "sm_80"}


@dataclass(frozen=True)
class StaticReport:
    name: str
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    shared_bytes: int  # Triton's shared memory for the launch (what must fit the per-block limit)
    uses_wgmma: bool


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _signature(config: dict) -> dict:
    """Triton wants every argument in the signature, constexprs spelled 'constexpr'."""
    sig = dict(config["signature"])
    sig.update({name: "constexpr" for name in config["constexprs"]})
    arg_names = config["fn"].arg_names
    missing = [a for a in arg_names if a not in sig]
    if missing:
        raise ValueError(f"{config['name']}: signature lacks arguments {missing}")
    return {a: sig[a] for a in arg_names}


def compile_ptx(config: dict, arch: int):
    """Triton's compiled kernel (PTX in .asm['ptx'], metadata) for one configuration on sm_<arch>."""
    src = ASTSource(config["fn"], _signature(config), constexprs=dict(config["constexprs"]))
    options = {"num_warps": config.get("num_warps", 4), "num_stages": config.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def run_ptxas(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from `ptxas -v` on the given PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(), "-v", f"--gpu-name={PTXAS_ARCH[arch]}", path,
                              "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    if registers is None or not spills:
        raise RuntimeError(f"could not parse ptxas -v output:\n{text}")
    return int(registers.group(1)), sum(int(s) for s in spills)


def compile_config(config: dict, arch: int) -> StaticReport:
    compiled = compile_ptx(config, arch)
    ptx = compiled.asm["ptx"]
    registers, spill_bytes = run_ptxas(ptx, arch)
    return StaticReport(name=config["name"], arch=arch, registers=registers, spill_bytes=spill_bytes,
                        shared_bytes=int(compiled.metadata.shared), uses_wgmma="wgmma" in ptx)
