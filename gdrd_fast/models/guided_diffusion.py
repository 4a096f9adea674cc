"""The paper's generative teacher: the encoder half of guided-diffusion's UNet, in its native module layout.

Module and key names follow openai/guided-diffusion (unet.py), which PGDiff's released FFHQ-512
checkpoint (iddpm_ffhq512_ema500000.pth) uses, so that checkpoint loads strictly once 'module.' and
the decoder (output_blocks.*, out.*) are dropped. Described in docs/method/models.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import load_exact, read_state_dict, strip_prefix


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 512              # attention levels are chosen from this, not from the input size
    in_channels: int = 3
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 8, 8, 16, 16)
    num_res_blocks: tuple[int, ...] = (1, 2, 2, 2, 2, 3, 4)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True

    def __post_init__(self):
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ValueError(f"num_res_blocks {self.num_res_blocks} needs one entry per level of "
                             f"channel_mult {self.channel_mult}")


PGDIFF_FFHQ512 = UNetConfig()  # PGDiff's FFHQ-512 network (docs/method/models.md)


def _norm(channels: int) -> nn.GroupNorm:
    return _GroupNorm32(32, channels)


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (or float64) whatever the activation dtype, as guided-diffusion does."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype),
                            self.eps).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of timesteps t (B,), frequencies max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """norm-SiLU-conv, add (or FiLM with) the time embedding, norm-SiLU-dropout-conv, plus the skip path."""

    def __init__(self, cin: int, cout: int, emb_dim: int, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if use_scale_shift_norm else cout))
        self.out_layers = nn.Sequential(_norm(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class AttentionBlock(nn.Module):
    """Self-attention over positions. qkv channels are laid out head by head, [q_h; k_h; v_h] per head
    (guided-diffusion's default 'legacy' order), which is what the released weights expect."""

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention channels {channels} are not a multiple of num_head_channels "
                             f"{num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.reshape(b, self.num_heads, 3, c // self.num_heads, -1).transpose(-1, -2).unbind(2)
        h = F.scaled_dot_product_attention(q, k, v)  # (b, heads, positions, head channels)
        h = h.transpose(-1, -2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """guided-diffusion's TimestepEmbedSequential: the time embedding goes to the ResBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def level_end(config: UNetConfig, level: int) -> int:
    """Index of the last input block of `level` (before its downsample): 17 for level 5 of PGDiff."""
    if not 0 <= level < len(config.channel_mult):
        raise ValueError(f"level must be in [0, {len(config.channel_mult)}), got {level}")
    return sum(config.num_res_blocks[:level + 1]) + level


# After the 5th downsampling stage: 512x14x14 for a 448x448 input (docs/method/models.md).
DEFAULT_TAP = f"input_blocks.{level_end(PGDIFF_FFHQ512, 5)}"


class GuidedDiffusionEncoder(nn.Module):
    """time_embed, input_blocks (and middle_block) of guided-diffusion's UNet, up to `tap`.

    tap: 'input_blocks.<n>' or 'middle_block'. forward(x, timestep=0) -> the tapped feature.
    Attributes: tap, out_channels, stride (input size / tapped feature size), input_size (the side the
    LR face is resized to: 448 [choice, docs/method/models.md]), feature_shape.
    """

    def __init__(self, config: UNetConfig = PGDIFF_FFHQ512, tap: str = DEFAULT_TAP, input_size: int = 448):
        super().__init__()
        self.config, self.tap, self.input_size = config, tap, input_size
        mc = config.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = config.channel_mult[0] * mc
        blocks = [EmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))]
        shapes, ds = [(ch, 1)], 1  # (channels, stride) after each input block
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks[level]):
                layers = [ResBlock(ch, mult * mc, emb_dim, config.use_scale_shift_norm)]
                ch = mult * mc
                if config.image_size // ds in config.attention_resolutions:
                    layers.append(AttentionBlock(ch, config.num_head_channels))
                blocks.append(EmbedSequential(*layers))
                shapes.append((ch, ds))
            if level != len(config.channel_mult) - 1:
                ds *= 2
                blocks.append(EmbedSequential(Downsample(ch)))
                shapes.append((ch, ds))
        taps = [f"input_blocks.{n}" for n in range(len(blocks))] + ["middle_block"]
        if tap not in taps:
            raise ValueError(f"tap must be 'input_blocks.<n>' with n < {len(blocks)} or 'middle_block', got {tap!r}")
        keep = len(blocks) if tap == "middle_block" else int(tap.split(".")[1]) + 1
        self.input_blocks = nn.ModuleList(blocks[:keep])
        self.middle_block = None
        if tap == "middle_block":
            self.middle_block = EmbedSequential(ResBlock(ch, ch, emb_dim, config.use_scale_shift_norm),
                                                AttentionBlock(ch, config.num_head_channels),
                                                ResBlock(ch, ch, emb_dim, config.use_scale_shift_norm))
        self.out_channels, self.stride = shapes[keep - 1]

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        side = self.input_size // self.stride
        return self.out_channels, side, side

    def unused_key(self, key: str) -> bool:
        """Whether a full-UNet checkpoint key belongs to a part this encoder dropped (decoder included)."""
        if key.startswith(("output_blocks.", "out.")):
            return True
        if key.startswith("middle_block."):
            return self.middle_block is None
        if key.startswith("input_blocks."):
            return int(key.split(".")[1]) >= len(self.input_blocks)
        return False

    def forward(self, x: Tensor, timestep: int | float | Tensor = 0) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        for block in self.input_blocks:
            x = block(x, emb)
        return self.middle_block(x, emb) if self.middle_block is not None else x


def load_pgdiff_encoder(source, tap: str = DEFAULT_TAP, config: UNetConfig = PGDIFF_FFHQ512) -> GuidedDiffusionEncoder:
    """The encoder with weights from a guided-diffusion checkpoint (path or state dict).

    'module.' is stripped, keys of the decoder and of blocks past the tap are dropped, and the rest must
    match exactly (ValueError naming every missing, unexpected or mis-shaped key).
    """
    encoder = GuidedDiffusionEncoder(config, tap)
    state = strip_prefix(read_state_dict(source, what="PGDiff weights"))
    return load_exact(encoder, {k: v for k, v in state.items() if not encoder.unused_key(k)}, what="PGDiff weights")
