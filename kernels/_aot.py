"""Ahead-of-time compilation of Triton kernels for a GPU that is not here (docs/performance/measuring.md).

`compile_config(config, arch)` lowers one kernel configuration to PTX for sm_90 or sm_80 with
triton.compile(target=GPUTarget(...)) and reads what ptxas reported while Triton assembled it: Triton's
own ptxas (the one its compiler picks for that architecture), with Triton's own flags, so the numbers are
those a launch on that GPU would get. It reports registers, spill bytes, shared memory, whether the PTX
uses wgmma (Hopper tensor-core MMA) and which operand types its MMAs take.

Each kernel module exposes STATIC_CONFIGS: a list of StaticConfig covering every configuration its
launchers can pick on the installed Triton (from the module's TILES table); tests/lib/test_triton_static.py
checks them all.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._tiles import StaticConfig

# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass(frozen=True)
class StaticReport:
    name: str
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    shared_bytes: int  # Triton's shared memory for the launch (what must fit the per-block limit)
    uses_wgmma: bool
    mma_operands: frozenset = field(default_factory=frozenset)  # operand types of the PTX's MMAs


def _signature(config: StaticConfig) -> dict:
    """Triton wants every argument in the signature, constexprs spelled 'constexpr'."""
    sig = dict(config.signature)
    sig.update({name: "constexpr" for name in config.constexprs})
    arg_names = config.fn.arg_names
    missing = [a for a in arg_names if a not in sig]
    if missing:
        raise ValueError(f"{config.name}: signature lacks arguments {missing}")
    return {a: sig[a] for a in arg_names}


def compile_with_ptxas_log(config: StaticConfig, arch: int):
    """(Triton's compiled kernel, the `ptxas -v` log of its assembly) for one configuration on sm_<arch>."""
    src = ASTSource(config.fn, _signature(config), constexprs=dict(config.constexprs))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    log = io.StringIO()
    # always_compile: a cached kernel would skip ptxas, and with it the log
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, log.getvalue()


def parse_ptxas_log(text: str) -> tuple[int, int]:
    """(registers, spill bytes) from a `ptxas -v` log."""
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    if registers is None or not spills:
        raise RuntimeError(f"could not parse the ptxas -v log:\n{text}")
    return int(registers.group(1)), sum(int(s) for s in spills)


# mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 and wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16:
# the A operand's type follows the f32 accumulator's
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma)\.sync\.aligned\.[\w.]*?\.f32\.(bf16|f16|tf32|e4m3|e5m2|s8|u8)\b")


def mma_operand_types(ptx: str) -> frozenset:
    return frozenset(_MMA.findall(ptx))


def compile_config(config: StaticConfig, arch: int) -> StaticReport:
    compiled, log = compile_with_ptxas_log(config, arch)
    ptx = compiled.asm["ptx"]
    registers, spill_bytes = parse_ptxas_log(log)
    return StaticReport(name=config.name, arch=arch, registers=registers, spill_bytes=spill_bytes,
                        shared_bytes=int(compiled.metadata.shared), uses_wgmma="wgmma" in ptx,
                        mma_operands=mma_operand_types(ptx))
