"""An op's eager twin: torch.library's dispatch costs every call host time that only torch.compile needs, so
an eager call runs the same kernel and the same backward through a plain autograd.Function."""
from __future__ import annotations

from typing import Callable

import torch


def eager_twin(custom_op: Callable, run: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """A function of the custom op's inputs: the custom op under torch.compile (which traces it), else an
    autograd.Function that runs `run` (what the custom op's body runs) with the setup_context and backward
    the custom op registers. Integer outputs (counts) are marked non-differentiable."""

    def forward(ctx, *inputs):
        output = run(*inputs)
        setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*(t for t in output if not t.is_floating_point()))
        return output

    twin = type(f"EagerTwin_{run.__name__.strip('_')}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*inputs):
        return custom_op(*inputs) if torch.compiler.is_compiling() else twin.apply(*inputs)

    return call
