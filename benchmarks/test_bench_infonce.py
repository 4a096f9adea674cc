"""infonce_bank_loss fwd+bwd: eager reference, torch.compile(reference), gdrd_fast backends and, on GPU,
FlexAttention (the stock-PyTorch expert spelling) and Inf-CL when installed (docs/performance/measuring.md)."""
from __future__ import annotations

import pytest
import torch

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import infonce as infonce_ops
from .harness import cases, measure, skip_unavailable

OP = "infonce_bank_loss"
SIZES = {
    "cpu": {"B256-K65536-D128": (256, 65536, 128), "B64-K16384-D128": (64, 16384, 128)},
    "cuda": {f"B{b}-K{k}-D{d}": (b, k, d) for b, k, d in
             [(256, 16384, 128), (256, 65536, 128), (1024, 65536, 128), (256, 1 << 20, 128), (1024, 65536, 512)]},
}
PROVIDERS = ["eager", "compile", "cpu", "triton"]
GPU_PEERS = ["flex_attention", "inf-cl"]


def flops(size_key: str, device: str) -> int:
    """Forward + dQuery in one pass: 4 B K D (docs/performance/index.md)."""
    b, k, d = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    return 4 * b * k * d


def _flex_attention_loss():
    """The bank as keys and values: LSE gives the loss, the softmax-weighted bank is dQuery's bank term."""
    from torch.nn.attention.flex_attention import flex_attention
    attend = torch.compile(flex_attention)

    def loss_fn(q, p, bank, temperature):
        scale = 1.0 / temperature
        _, lse = attend(q[None, None], bank[None, None], bank[None, None], scale=scale, return_lse=True)
        pos = (q.float() * p.float()).sum(1) * scale
        return (torch.logaddexp(lse[0, 0].float(), pos) - pos).mean()

    return loss_fn


def inf_cl_head_dim(d: int) -> int:
    """Inf-CL views [B, D] as [B, D / head_dim, head_dim] and sums the heads' products (the full dot
    product); its kernels take a head_dim of 16, 32, 64, 128 or 256 (default 256, which no D = 128 fits)."""
    fitting = [h for h in (256, 128, 64, 32, 16) if d % h == 0]
    if not fitting:
        raise ValueError(f"Inf-CL needs D divisible by 16, got D={d}")
    return fitting[0]


def _inf_cl_loss(d: int):
    """Inf-CL's tiled contrastive loss over keys [positives; bank] (B extra negatives per row)."""
    from inf_cl import cal_inf_loss
    head_dim = inf_cl_head_dim(d)

    def loss_fn(q, p, bank, temperature):
        labels = torch.arange(q.shape[0], device=q.device)
        return cal_inf_loss(q, torch.cat([p, bank]), labels=labels, scale=1.0 / temperature,
                            head_dim=head_dim).mean()

    return loss_fn


def build(provider: str, size_key: str, device: str):
    b, k, d = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)
    positive = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)
    bank = torch.nn.functional.normalize(torch.randn(k, d, device=device, generator=gen), dim=1).to(dtype)
    query.requires_grad_(True)
    if provider == "eager":
        loss_fn = reference.infonce_bank_loss
    elif provider == "compile":
        loss_fn = torch.compile(reference.infonce_bank_loss)
    elif provider == "flex_attention":
        loss_fn = _flex_attention_loss()
    elif provider == "inf-cl":
        loss_fn = _inf_cl_loss(d)
    else:
        loss_fn = lambda q, p, k_, temperature: gdrd_fast.infonce_bank_loss(q, p, k_, temperature=temperature,
                                                                          backend=provider)

    def step():
        query.grad = None
        loss_fn(query, positive, bank, temperature=0.07).backward()

    if provider == "flex_attention":
        try:  # its first call compiles: a size its kernel templates cannot take fails here, not mid-measure
            step()
        except Exception as error:  # the reason goes to the log's skip summary (-ra), one line
            pytest.skip(f"flex_attention at {size_key}: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}")
    return step


def _providers(device: str) -> list[str]:
    return PROVIDERS + (GPU_PEERS if device == "cuda" else [])


@pytest.mark.parametrize("provider,size_key,device", cases(SIZES, _providers))
def test_infonce_bank_loss(benchmark, provider, size_key, device):
    skip_unavailable(infonce_ops.IMPLS, provider, device)
    if provider == "inf-cl":
        pytest.importorskip("inf_cl")
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=5 if device == "cpu" else 50,
            flop=flops(size_key, device))
