"""The demo's generative teacher: a small diffusers UNet2DModel briefly trained as a DDPM denoiser.

Stage 1 then distils the encoder half of this UNet (models.DiffusionEncoder at a named tap), as GDRD
distils PGDiff's. Epsilon prediction with the linear beta schedule of DDPM (1e-4 .. 0.02).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..train.runtime import Runtime
from ..train.stages import Stage, Views


class DenoiserStage(Stage):
    name = "denoiser"

    def __init__(self, runtime: Runtime, unet, image_size: int, train_timesteps: int = 1000):
        super().__init__(runtime)
        self.unet, self.image_size = unet, image_size
        betas = torch.linspace(1e-4, 0.02, train_timesteps, dtype=torch.float64)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float())

    def losses(self, views: Views) -> dict[str, Tensor]:
        x0 = F.interpolate(views.hr, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        t = torch.randint(len(self.alpha_bar), (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        with self.runtime.autocast():
            predicted = self.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
        return {"denoise": F.mse_loss(predicted.float(), noise)}
