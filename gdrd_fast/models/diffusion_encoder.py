"""Generative teachers from diffusers: a UNet2DModel's encoder half (a diffusion model), or an
AutoencoderKL's encoder (generative, not diffusion), each cut at a named feature tap.

Every teacher declares input_size (the side it is fed), tap, out_channels, stride and feature_shape
(channels, side, side at input_size); the stage-1 adapter is built from that declaration.

diffusers is optional and imported only when a UNet is built or loaded. Weights come from local
files only (a save_pretrained folder or a state dict): nothing is downloaded.
"""
from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

from .checkpoints import load_exact, read_state_dict, strip_prefix

# UNet2DModel configs. "tiny" trains on a CPU in about a minute at 32..64 px; "pgdiff-like" follows
# PGDiff's FFHQ-512 network (docs/method/models.md) as far as UNet2DModel allows (one res-block count
# for all levels).
CONFIGS = {
    "tiny": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64),
                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                 attention_head_dim=32),
    "pgdiff-like": dict(sample_size=512, in_channels=3, out_channels=6,
                        block_out_channels=(32, 64, 128, 256, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D",) * 3,
                        up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 4, norm_num_groups=32,
                        attention_head_dim=64, resnet_time_scale_shift="scale_shift"),
}
# Where each config is tapped by default: the last full-resolution feature at stride 4 ("tiny",
# 14x14 for a 56x56 input) and the 512-channel stride-32 feature ("pgdiff-like", 512x14x14 at 448x448).
DEFAULT_TAPS = {"tiny": "down_blocks.2", "pgdiff-like": "down_blocks.5.attentions.1"}
_TAP = re.compile(r"conv_in|mid_block|down_blocks\.(\d+)(?:\.(resnets|attentions)\.(\d+))?")
_DECODER = ("up_blocks.", "conv_norm_out.", "conv_out.")


def _diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError("the diffusion teacher needs the optional package 'diffusers': "
                          "pip install 'gdrd_fast[diffusion]' (or pip install diffusers)") from exc
    return diffusers


def _named_config(config: str | dict, named: dict) -> dict:
    """A config dict: `config` itself, or the entry of `named` it names."""
    if isinstance(config, str):
        if config not in named:
            raise ValueError(f"config must be one of {sorted(named)} or a dict, got {config!r}")
        return named[config]
    if not isinstance(config, dict):
        raise TypeError(f"config must be a name or a dict, got {type(config).__name__}")
    return config


def build_unet(config: str | dict = "tiny"):
    """A randomly initialised diffusers UNet2DModel from a CONFIGS name or a config dict."""
    return _diffusers().UNet2DModel(**_named_config(config, CONFIGS))


def load_unet(folder: str | os.PathLike):
    """A UNet2DModel saved with save_pretrained(folder); local files only."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder: no directory at {os.fspath(folder)!r}")
    return _diffusers().UNet2DModel.from_pretrained(os.fspath(folder), local_files_only=True)


def timesteps(timestep: int | float | Tensor, x: Tensor) -> Tensor:
    """One timestep per sample of x, as UNet2DModel.forward reads it: a Python number becomes a long
    (a fraction is dropped), a tensor keeps its dtype; a scalar or a 1-element tensor is broadcast."""
    if torch.is_tensor(timestep):
        t = timestep.to(x.device).reshape(-1)
    elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        t = torch.tensor([timestep], dtype=torch.long, device=x.device)
    else:
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
    if t.numel() not in (1, x.shape[0]):
        raise ValueError(f"timestep must hold 1 or {x.shape[0]} (the batch) values, got {t.numel()}")
    return t.expand(x.shape[0])


class DiffusionEncoder(nn.Module):
    """UNet2DModel's time embedding, conv_in, down blocks (and mid block) up to `tap`.

    forward(x, timestep=0) -> the tapped feature map. The module keeps only what the tap needs, under
    the UNet's own key names, so the UNet's state dict (minus the unused part) loads into it.
    Attributes: tap, out_channels, stride (input size / tapped feature size), input_size (default: the
    UNet's sample_size), feature_shape.
    """

    def __init__(self, unet, tap: str, input_size: int | None = None):
        super().__init__()
        match = _TAP.fullmatch(tap) if isinstance(tap, str) else None
        if match is None:
            raise ValueError("tap must be 'conv_in', 'mid_block', 'down_blocks.<i>' or "
                             f"'down_blocks.<i>.resnets|attentions.<j>', got {tap!r}")
        config, blocks = unet.config, unet.down_blocks
        if getattr(unet, "class_embedding", None) is not None:
            raise ValueError("class-conditional UNets are not supported as teachers")
        if config.time_embedding_type != "positional":
            raise ValueError(f"only positional time embeddings are supported, got {config.time_embedding_type!r}")
        names = dict(unet.named_modules())
        if tap not in names:
            raise ValueError(f"tap {tap!r} is not a module of this UNet")
        self.tap, self.center_input_sample = tap, bool(config.center_input_sample)
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        downsamples = [b.downsamplers is not None for b in blocks]
        if tap == "conv_in":
            last, inner, self.out_channels, steps = -1, None, config.block_out_channels[0], 0
        elif tap == "mid_block":
            last, inner, self.out_channels, steps = len(blocks) - 1, None, config.block_out_channels[-1], sum(downsamples)
        else:
            last, inner = int(match.group(1)), match.group(2)
            self.out_channels = config.block_out_channels[last]
            steps = sum(downsamples[:last]) + (downsamples[last] if inner is None else 0)
        self.stride = 2 ** steps
        self.input_size = int(input_size or config.sample_size)
        self.down_blocks = nn.ModuleList(list(blocks)[:last + 1])
        self.mid_block = unet.mid_block if tap == "mid_block" else None
        # a tap inside a block is caught by a hook on it; kept by name, not as a second registered
        # submodule (that would duplicate its keys and break loading a full UNet state dict)
        self.inner_tap = tap if inner is not None else None

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        side = self.input_size // self.stride
        return self.out_channels, side, side

    def unused_key(self, key: str) -> bool:
        """Whether a full-UNet state-dict key belongs to a part this encoder dropped."""
        if key.startswith(_DECODER):
            return True
        if key.startswith("mid_block."):
            return self.mid_block is None
        if key.startswith("down_blocks."):
            return int(key.split(".")[1]) >= len(self.down_blocks)
        return False

    def forward(self, x: Tensor, timestep: int | float | Tensor = 0) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"x must be (B, {self.conv_in.in_channels}, H, W), got {tuple(x.shape)}")
        if self.center_input_sample:
            x = 2 * x - 1.0
        t = timesteps(timestep, x)
        emb = self.time_embedding(self.time_proj(t).to(self.conv_in.weight.dtype))
        skip, h = x, self.conv_in(x)
        if self.tap == "conv_in":
            return h
        tapped = []
        inner = self.get_submodule(self.inner_tap) if self.inner_tap is not None else None
        hook = inner.register_forward_hook(lambda m, i, out: tapped.append(out)) if inner is not None else None
        try:
            for block in self.down_blocks:
                if hasattr(block, "skip_conv"):
                    h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
                else:
                    h, _ = block(hidden_states=h, temb=emb)
        finally:
            if hook is not None:
                hook.remove()
        if inner is not None:
            return tapped[-1]
        return self.mid_block(h, emb) if self.mid_block is not None else h


def diffusion_encoder(config: str | dict = "tiny", weights=None, tap: str | None = None,
                      input_size: int | None = None) -> DiffusionEncoder:
    """The generative teacher from a config, with weights from a local folder or a state dict.

    weights: None (random init), a save_pretrained folder (its own config is used; `config` only picks
    the default tap), or a state dict / .pt / .safetensors file of the full UNet or of the encoder,
    'module.'-prefixed or not, loaded strictly after the encoder's unused keys are dropped.
    """
    if tap is None:
        if not isinstance(config, str) or config not in DEFAULT_TAPS:
            raise ValueError("tap is required unless config is one of " + ", ".join(sorted(DEFAULT_TAPS)))
        tap = DEFAULT_TAPS[config]
    if input_size is None and config == "pgdiff-like":
        input_size = 448  # docs/method/models.md: the LR face upsampled to 448
    if isinstance(weights, (str, os.PathLike)) and os.path.isdir(weights):
        return DiffusionEncoder(load_unet(weights), tap, input_size)
    encoder = DiffusionEncoder(build_unet(config), tap, input_size)
    if weights is not None:
        state = strip_prefix(read_state_dict(weights, what="diffusion teacher weights"))
        load_exact(encoder, {k: v for k, v in state.items() if not encoder.unused_key(k)},
                   what="diffusion teacher weights")
    return encoder


# AutoencoderKL configs: "tiny" trains on a CPU in seconds at 32 px.
VAE_CONFIGS = {
    "tiny": {"sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32, 64),
             "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
             "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8},
}
_VAE_TAP = re.compile(r"conv_in|mid_block|latent|down_blocks\.(\d+)")


def build_vae(config: str | dict = "tiny"):
    """A randomly initialised diffusers AutoencoderKL from a VAE_CONFIGS name or a config dict."""
    return _diffusers().AutoencoderKL(**_named_config(config, VAE_CONFIGS))


class VAEEncoder(nn.Module):
    """AutoencoderKL's encoder up to `tap`: 'conv_in', 'down_blocks.<i>', 'mid_block', or 'latent' (the
    posterior mean after quant_conv). A generative teacher that is not a diffusion model: no timestep.

    Its state dict keeps the VAE's key names (encoder.*, quant_conv.*), so a full AutoencoderKL state
    dict loads once the decoder's keys are dropped.
    """

    def __init__(self, vae, tap: str = "latent", input_size: int | None = None):
        super().__init__()
        match = _VAE_TAP.fullmatch(tap) if isinstance(tap, str) else None
        encoder = vae.encoder
        if match is None or (match.group(1) is not None and int(match.group(1)) >= len(encoder.down_blocks)):
            raise ValueError(f"tap must be 'conv_in', 'down_blocks.<i>' (i < {len(encoder.down_blocks)}), "
                             f"'mid_block' or 'latent', got {tap!r}")
        config = vae.config
        self.tap, self.encoder = tap, encoder
        self.quant_conv = vae.quant_conv if tap == "latent" else None
        if tap == "latent" and self.quant_conv is None:
            raise ValueError("tap 'latent' needs a VAE with quant_conv (use_quant_conv=True)")
        downsamples = [b.downsamplers is not None for b in encoder.down_blocks]
        if tap == "conv_in":
            self.blocks, self.out_channels = 0, config.block_out_channels[0]
        elif match.group(1) is not None:
            self.blocks = int(match.group(1)) + 1
            self.out_channels = config.block_out_channels[self.blocks - 1]
        else:
            self.blocks = len(encoder.down_blocks)
            self.out_channels = config.latent_channels if tap == "latent" else config.block_out_channels[-1]
        self.stride = 2 ** sum(downsamples[:self.blocks])
        self.input_size = int(input_size or config.sample_size)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        side = self.input_size // self.stride
        return self.out_channels, side, side

    def unused_key(self, key: str) -> bool:
        """Whether a full-VAE state-dict key belongs to a part this encoder does not use."""
        if key.startswith(("decoder.", "post_quant_conv.")):
            return True
        return key.startswith("quant_conv.") and self.quant_conv is None

    def forward(self, x: Tensor, timestep: float | Tensor = 0) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.encoder.conv_in.in_channels:
            raise ValueError(f"x must be (B, {self.encoder.conv_in.in_channels}, H, W), got {tuple(x.shape)}")
        if not (isinstance(timestep, (int, float)) and timestep == 0):
            raise ValueError(f"an autoencoder teacher has no timestep: timestep must be 0, got {timestep!r}")
        h = self.encoder.conv_in(x)
        for block in self.encoder.down_blocks[:self.blocks]:
            h = block(h)
        if self.tap in ("mid_block", "latent"):
            h = self.encoder.mid_block(h)
        if self.tap == "latent":
            e = self.encoder
            h = self.quant_conv(e.conv_out(e.conv_act(e.conv_norm_out(h))))
            h = h[:, :self.out_channels]  # the posterior mean (the rest is its log-variance)
        return h


def vae_encoder(config: str | dict = "tiny", weights=None, tap: str = "latent",
                input_size: int | None = None) -> VAEEncoder:
    """The autoencoder teacher from a config, with weights from a save_pretrained folder or a state dict
    / .pt / .safetensors file of the full AutoencoderKL or of the encoder ('module.'-prefixed or not)."""
    if isinstance(weights, (str, os.PathLike)) and os.path.isdir(weights):
        vae = _diffusers().AutoencoderKL.from_pretrained(os.fspath(weights), local_files_only=True)
        return VAEEncoder(vae, tap, input_size)
    encoder = VAEEncoder(build_vae(config), tap, input_size)
    if weights is not None:
        state = strip_prefix(read_state_dict(weights, what="autoencoder teacher weights"))
        load_exact(encoder, {k: v for k, v in state.items() if not encoder.unused_key(k)},
                   what="autoencoder teacher weights")
    return encoder
