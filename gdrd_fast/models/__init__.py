"""The networks of GDRD (docs/method/models.md): the IResNet student and discriminative teacher, the
ArcFace head, and the generative teachers (guided-diffusion / PGDiff, or any diffusers UNet2DModel).

The build_* functions are what a trainer calls from a config. diffusers is imported only when a
diffusers teacher is built.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .checkpoints import CorruptCheckpointError
from .diffusion_encoder import CONFIGS as DIFFUSERS_CONFIGS
from .diffusion_encoder import VAE_CONFIGS, DiffusionEncoder, VAEEncoder, build_unet, build_vae, diffusion_encoder, \
    load_unet, vae_encoder
from .guided_diffusion import (DEFAULT_TAP, PGDIFF_FFHQ512, GuidedDiffusionEncoder, UNetConfig, level_end,
                               load_pgdiff_encoder)
from .heads import ArcFaceHead, ArcFaceLogits
from .iresnet import (IResNet, StudentBackbone, StudentHead, get_model, iresnet18, iresnet34, iresnet50,
                      iresnet100, load_backbone, split_student)

GENERATIVE_KINDS = ("pgdiff", "diffusers", "vae")


class Student(NamedTuple):
    net: IResNet              # the whole network: insightface keys, what a checkpoint saves
    backbone: StudentBackbone  # S_b, trained in stage 1 then frozen
    head: StudentHead          # S_h, trained in stage 2


def build_student(arch: str = "r18", weights=None, **kwargs) -> Student:
    """The student IResNet and its (S_b, S_h) split; weights: optional insightface checkpoint."""
    net = get_model(arch, **kwargs) if weights is None else load_backbone(weights, arch, **kwargs)
    return Student(net, *split_student(net))


def build_discriminative_teacher(arch: str = "r50", weights=None, **kwargs) -> IResNet:
    """T_d: an ArcFace IResNet, from an insightface checkpoint (path or state dict) when given."""
    return get_model(arch, **kwargs) if weights is None else load_backbone(weights, arch, **kwargs)


def build_generative_teacher(kind: str = "pgdiff", config=None, weights=None, tap: str | None = None) -> nn.Module:
    """T_g: an encoder whose forward(x, timestep=0) returns the tapped feature; it declares .input_size,
    .tap, .out_channels, .stride and .feature_shape.

    kind 'pgdiff': guided-diffusion layout; config a UNetConfig (default PGDiff FFHQ-512), weights a
    checkpoint path or state dict, tap default 'input_blocks.17' (512 x H/32).
    kind 'diffusers': a UNet2DModel; config 'tiny' | 'pgdiff-like' | dict, weights a save_pretrained
    folder or a state dict / file, tap default per config.
    kind 'vae': a diffusers AutoencoderKL encoder (generative, not diffusion); config 'tiny' | dict,
    weights a save_pretrained folder or a state dict / file, tap default 'latent'.
    """
    if kind == "pgdiff":
        config = PGDIFF_FFHQ512 if config is None else config
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config for kind 'pgdiff' must be a UNetConfig, got {type(config).__name__}")
        tap = DEFAULT_TAP if tap is None else tap
        if weights is None:
            return GuidedDiffusionEncoder(config, tap)
        return load_pgdiff_encoder(weights, tap, config)
    if kind == "diffusers":
        return diffusion_encoder("tiny" if config is None else config, weights, tap)
    if kind == "vae":
        return vae_encoder("tiny" if config is None else config, weights, "latent" if tap is None else tap)
    raise ValueError(f"kind must be one of {GENERATIVE_KINDS}, got {kind!r}")


__all__ = ["IResNet", "StudentBackbone", "StudentHead", "Student", "get_model", "iresnet18", "iresnet34",
           "iresnet50", "iresnet100", "load_backbone", "split_student", "ArcFaceHead", "ArcFaceLogits",
           "GuidedDiffusionEncoder", "UNetConfig", "PGDIFF_FFHQ512", "DEFAULT_TAP", "level_end",
           "load_pgdiff_encoder", "DiffusionEncoder", "DIFFUSERS_CONFIGS", "build_unet", "load_unet",
           "diffusion_encoder", "VAE_CONFIGS", "VAEEncoder", "build_vae", "vae_encoder", "build_student",
           "build_discriminative_teacher", "build_generative_teacher", "CorruptCheckpointError"]
