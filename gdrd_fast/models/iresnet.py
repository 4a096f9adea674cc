"""IResNet face backbones in insightface arcface_torch's state-dict layout, and the GDRD student split.

Keys match insightface's backbones/iresnet.py (conv1, bn1, prelu, layer1..4 of IBasicBlock, bn2, fc,
features), so its released checkpoints load strictly. 112x112 input, 512-d output.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .checkpoints import load_exact, read_state_dict, strip_prefix

LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)
BACKBONE_PARTS = ("conv1", "bn1", "prelu", "layer1", "layer2", "layer3")
HEAD_PARTS = ("layer4", "bn2", "dropout", "fc", "features")
FEATURE_MAP = 7  # layer4's spatial size for a 112x112 input


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus the (downsampled) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


def _autocast(x: Tensor, enabled: bool):
    # insightface's fp16 flag: the convolutional trunk under autocast, the fc in fp32
    dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    return torch.autocast(x.device.type, dtype=dtype, enabled=enabled)


def _backbone_forward(m: nn.Module, x: Tensor) -> Tensor:
    with _autocast(x, m.fp16):
        return m.layer3(m.layer2(m.layer1(m.prelu(m.bn1(m.conv1(x))))))


def _head_forward(m: nn.Module, f: Tensor) -> Tensor:
    with _autocast(f, m.fp16):
        f = m.dropout(torch.flatten(m.bn2(m.layer4(f)), 1))
    return m.features(m.fc(f.float()))


class IResNet(nn.Module):
    """insightface IResNet: (B, 3, 112, 112) in [-1, 1] -> (B, num_features) embedding (not normalised)."""

    def __init__(self, layers, dropout: float = 0.0, num_features: int = 512, fp16: bool = False):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")
        self.fp16 = fp16
        self.conv1 = _conv3x3(3, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=1e-5)
        self.prelu = nn.PReLU(WIDTHS[0])
        cin = WIDTHS[0]
        for i, (n, width) in enumerate(zip(layers, WIDTHS)):
            blocks = [IBasicBlock(cin, width, stride=2)] + [IBasicBlock(width, width) for _ in range(int(n) - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.bn2 = nn.BatchNorm2d(WIDTHS[-1], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(WIDTHS[-1] * FEATURE_MAP * FEATURE_MAP, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        self.num_features = num_features
        self._init_like_insightface()

    def _init_like_insightface(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)  # a fixed-scale final BN, as insightface trains it

    def forward(self, x: Tensor) -> Tensor:
        return _head_forward(self, _backbone_forward(self, x))


class _Part(nn.Module):
    """A view onto some top-level modules of an IResNet: same module objects, same state-dict keys."""

    parts: tuple[str, ...] = ()

    def __init__(self, net: IResNet):
        super().__init__()
        self.fp16 = net.fp16
        for name in self.parts:
            setattr(self, name, getattr(net, name))


class StudentBackbone(_Part):
    """S_b of docs/method/models.md: conv1..layer3, (B, 3, 112, 112) -> (B, 256, 14, 14)."""

    parts = BACKBONE_PARTS
    out_channels = WIDTHS[2]

    def forward(self, x: Tensor) -> Tensor:
        return _backbone_forward(self, x)


class StudentHead(_Part):
    """S_h of docs/method/models.md: layer4 + BN + FC + BN, (B, 256, 14, 14) -> (B, 512)."""

    parts = HEAD_PARTS

    def forward(self, f: Tensor) -> Tensor:
        return _head_forward(self, f)


def split_student(net: IResNet) -> tuple[StudentBackbone, StudentHead]:
    """(S_b, S_h) sharing `net`'s parameters: head(backbone(x)) == net(x), and loading `net` loads both."""
    if not isinstance(net, IResNet):
        raise TypeError(f"net must be an IResNet, got {type(net).__name__}")
    return StudentBackbone(net), StudentHead(net)


def get_model(name: str, **kwargs) -> IResNet:
    """insightface's naming: get_model('r50', fp16=False, num_features=512, dropout=0.0)."""
    if name not in LAYERS:
        raise ValueError(f"name must be one of {sorted(LAYERS)}, got {name!r}")
    return IResNet(LAYERS[name], **kwargs)


def iresnet18(**kwargs) -> IResNet:
    return get_model("r18", **kwargs)


def iresnet34(**kwargs) -> IResNet:
    return get_model("r34", **kwargs)


def iresnet50(**kwargs) -> IResNet:
    return get_model("r50", **kwargs)


def iresnet100(**kwargs) -> IResNet:
    return get_model("r100", **kwargs)


def load_backbone(source, model: str | IResNet | StudentBackbone | StudentHead = "r50", **kwargs) -> nn.Module:
    """Load an insightface checkpoint (path or state dict; 'module.' stripped) strictly into `model`.

    `model` is an arch name (a fresh get_model(name, **kwargs) is built), an IResNet, or one half of a
    split student, which takes its own keys and leaves the other half's. Raises ValueError naming
    every missing, unexpected or mis-shaped key, before anything is changed.
    """
    if isinstance(model, str):
        model = get_model(model, **kwargs)
    elif kwargs:
        raise TypeError("keyword arguments only apply when model is an arch name")
    if not isinstance(model, (IResNet, _Part)):
        raise TypeError(f"model must be an arch name, IResNet, StudentBackbone or StudentHead, got "
                        f"{type(model).__name__}")
    state = strip_prefix(read_state_dict(source, what="IResNet weights"))
    if isinstance(model, _Part):
        other_half = set(BACKBONE_PARTS + HEAD_PARTS) - set(model.parts)
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in other_half}
    return load_exact(model, state, what="IResNet weights")
