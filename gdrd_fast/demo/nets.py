"""The demo's small face networks: a narrow, shallow IResNet for 64x64 faces, split like the student.

The paper's IResNet-18 costs ~2.6 GFLOP per 112x112 face, too much for a 10-minute CPU demo; this one
keeps the layout (IBasicBlock stages, S_b = stem..layer3, S_h = layer4 + BN + FC + BN) at ~1/100 the cost.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..models.iresnet import IBasicBlock


class SmallBackbone(nn.Module):
    """S_b: (B, 3, S, S) -> (B, 4w, S/8, S/8); a strided stem keeps full-resolution work small."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.PReLU(width))
        self.layers = nn.Sequential(IBasicBlock(width, 2 * width, 2), IBasicBlock(2 * width, 4 * width, 2))
        self.out_channels = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


class SmallHead(nn.Module):
    """S_h: (B, 4w, S/8, S/8) -> (B, embedding_dim)."""

    def __init__(self, width: int = 16, image_size: int = 64, embedding_dim: int = 128):
        super().__init__()
        side = image_size // 16
        self.layer = IBasicBlock(4 * width, 8 * width, 2)
        self.bn = nn.BatchNorm2d(8 * width)
        self.fc = nn.Linear(8 * width * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)

    def forward(self, f: Tensor) -> Tensor:
        return self.features(self.fc(self.bn(self.layer(f)).flatten(1)))


class SmallFaceNet(nn.Module):
    """backbone + head; forward gives the embedding."""

    def __init__(self, width: int = 16, image_size: int = 64, embedding_dim: int = 128):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
        self.backbone = SmallBackbone(width)
        self.head = SmallHead(width, image_size, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
