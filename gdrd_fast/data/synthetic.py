"""A deterministic, labelled, SYNTHETIC face-like data set for the offline demo (docs/method/demo.md).

No labelled face set can be downloaded here, so identities are drawn, not photographed. The task is
hard the way the real one is:
- coarse identity, which survives 16x16: face shape, skin and hair tone, placement and size of eyes,
  brows, nose and mouth;
- fine identity, which 16x16 destroys: a skin micro-texture (gratings of 3.8-5.8 px wavelength at
  64 px, 1-1.4 px at 16), small marks (moles about 2 px across at 64), the contour shape of the eyes,
  iris colour, lip shape;
- nuisance within an identity: pose (shift, rotation, scale), illumination gradient and colour cast,
  expression (smile, open mouth, eye openness), background and sensor noise.
Every image is drawn with vectorised tensor maths on a continuous face frame, so it can be rendered at
any size (112 or 64) and thousands of images take seconds on a CPU. Image i of identity k depends only
on (seed, k, i). Every name this module produces says "synthetic".
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .images import atomic_write_bytes, encode_png, from_uint8, to_uint8
from .pairs_bin import write_pairs_bin

NAME = "synthetic-faces"
# Per identity: name -> (low, high) of a uniform draw. Coordinates: the face frame spans [-1, 1].
# Coarse ranges sit between wide (16x16 alone verifies ~94%: no room for distillation) and narrow
# (nothing learnable even at 64 px): about 0.55 of the wide spread. Tuned with the demo recipe, issue 5.
COARSE_RANGES = {
    "face_a": (0.53, 0.67), "face_b": (0.70, 0.82), "skin_tone": (0.44, 0.76), "skin_hue": (-0.042, 0.042),
    "hair_tone": (0.12, 0.49), "hair_up": (0.047, 0.184),
    "eye_x": (0.242, 0.338), "eye_y": (-0.166, -0.049), "eye_w": (0.101, 0.139), "eye_h": (0.0454, 0.0646),
    "brow_gap": (0.074, 0.126), "brow_tilt": (-0.17, 0.17), "nose_len": (0.167, 0.273),
    "mouth_y": (0.336, 0.453), "mouth_w": (0.152, 0.238), "lip_tone": (0.33, 0.62),
}
FINE_RANGES = {
    "eye_power": (1.4, 3.2), "iris_r": (0.15, 0.7), "iris_g": (0.15, 0.6), "iris_b": (0.15, 0.7),
    "lip_ratio": (0.3, 0.7), "lip_bow": (0.0, 0.02),
}
IDENTITY_RANGES = {**COARSE_RANGES, **FINE_RANGES}
TEXTURE_WAVES = 3          # gratings per identity
TEXTURE_AMPLITUDE = 0.22   # relative change of the skin colour at the crests
TEXTURE_WAVELENGTH = (0.12, 0.18)    # face-frame units: 3.8 .. 5.8 px at 64 (learnable), 1 .. 1.4 at 16 (gone)
MOLES = 7
MOLE_SIGMA = 0.025     # face-frame units: a Gaussian of 0.8 px sigma at 64 px, 0.2 px at 16
NUISANCE_RANGES = {
    "shift_x": (-0.07, 0.07), "shift_y": (-0.07, 0.07), "angle": (-0.18, 0.18), "log_scale": (-0.085, 0.085),
    "light_x": (-0.37, 0.37), "light_y": (-0.37, 0.37), "brightness": (0.75, 1.17),
    "cast_r": (-0.065, 0.065), "cast_g": (-0.065, 0.065), "cast_b": (-0.065, 0.065),
    "smile": (-1.0, 1.0), "mouth_open": (0.0, 1.0), "eye_open": (0.55, 1.1),
    "bg_r": (0.1, 0.9), "bg_g": (0.1, 0.9), "bg_b": (0.1, 0.9), "noise": (0.005, 0.035),
}
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_IDENTITY_STREAM, _NUISANCE_STREAM = 0, 1


def _generator(seed: int, identity: int, stream: int) -> torch.Generator:
    """An independent random stream per (seed, identity, what is drawn)."""
    mixed = seed * _MIX[0] + (identity + 1) * _MIX[1] + (stream + 1) * _MIX[2]
    return torch.Generator().manual_seed(mixed % (2 ** 63 - 1))


def _uniform(g: torch.Generator, ranges: dict[str, tuple[float, float]], n: int) -> dict[str, Tensor]:
    u = torch.rand(n, len(ranges), generator=g, dtype=torch.float64)
    return {k: (lo + (hi - lo) * u[:, j]).float() for j, (k, (lo, hi)) in enumerate(ranges.items())}


def identity_parameters(seed: int, identity: int) -> dict[str, Tensor]:
    """Everything that makes identity `identity` of data set `seed` (coarse and fine)."""
    g = _generator(seed, identity, _IDENTITY_STREAM)
    p = {k: v[0] for k, v in _uniform(g, IDENTITY_RANGES, 1).items()}
    p["wave_k"] = 2 * math.pi / (TEXTURE_WAVELENGTH[0] + (TEXTURE_WAVELENGTH[1] - TEXTURE_WAVELENGTH[0])
                                 * torch.rand(TEXTURE_WAVES, generator=g))
    p["wave_angle"] = math.pi * torch.rand(TEXTURE_WAVES, generator=g)
    p["wave_phase"] = 2 * math.pi * torch.rand(TEXTURE_WAVES, generator=g)
    p["mole_u"] = (torch.rand(MOLES, generator=g) * 2 - 1) * 0.7   # times face_a when drawn
    p["mole_v"] = (torch.rand(MOLES, generator=g) * 2 - 1) * 0.8   # times face_b
    p["mole_dark"] = 0.35 + 0.4 * torch.rand(MOLES, generator=g)
    return p


def nuisance_parameters(seed: int, identity: int, count: int) -> dict[str, Tensor]:
    """Pose, light, expression, background and noise of the first `count` images of `identity`."""
    g = _generator(seed, identity, _NUISANCE_STREAM)
    # One row per image, drawn row by row in order, so image i does not depend on `count`.
    u = torch.rand(count, len(NUISANCE_RANGES) + 1, generator=g, dtype=torch.float64)
    out = {k: (lo + (hi - lo) * u[:, j]).float() for j, (k, (lo, hi)) in enumerate(NUISANCE_RANGES.items())}
    out["noise_seed"] = (u[:, -1] * 2 ** 31).long()
    return out


def _stack(params: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def _soft(signed_distance: Tensor, pixel: Tensor | float) -> Tensor:
    """Inside (negative distance) -> 1, with an edge about one pixel wide (antialiased shapes)."""
    return torch.sigmoid(-signed_distance / (0.5 * pixel))


def _ellipse(u: Tensor, v: Tensor, cu, cv, a, b, pixel: Tensor | float, power=2.0) -> Tensor:
    """Soft (super)ellipse mask centred at (cu, cv) with half-axes (a, b); per-image tensors are (N,1,1)."""
    if isinstance(power, float):   # the common round case: cheaper than pow
        r = (((u - cu) / a).square_() + ((v - cv) / b).square_()).sqrt_()
    else:
        r = (((u - cu).abs() / a).pow(power) + ((v - cv).abs() / b).pow(power)).clamp_min(1e-12).pow(1.0 / power)
    return _soft((r - 1.0) * torch.minimum(a, b), pixel)


def _blend(canvas: Tensor, mask: Tensor, colour: Tensor) -> Tensor:
    """canvas (N,3,H,W), mask (N,H,W), colour (N,3) or (N,3,H,W)."""
    if colour.dim() == 2:
        colour = colour[:, :, None, None]
    return canvas.lerp_(colour.expand_as(canvas), mask[:, None])


def _splat_spots(cu: Tensor, cv: Tensor, weight: Tensor, sigma: float, nuisance: dict[str, Tensor],
                 size: int) -> Tensor:
    """Sum of small Gaussian spots, centres (N, S) in the face frame, each drawn only on the few pixels
    around it (a full-frame Gaussian per spot would cost more than the rest of the face)."""
    n = cu.shape[0]
    pixel = 2.0 / size
    scale, angle = nuisance["log_scale"].exp()[:, None], nuisance["angle"][:, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    x = scale * (cos * cu - sin * cv) + nuisance["shift_x"][:, None]     # face frame -> image
    y = scale * (sin * cu + cos * cv) + nuisance["shift_y"][:, None]
    col, row = ((x + 1) / pixel - 0.5)[..., None, None], ((y + 1) / pixel - 0.5)[..., None, None]
    radius = max(1, math.ceil(4 * sigma / pixel))   # fixed, so an image never depends on its batch
    offsets = torch.arange(-radius, radius + 1)
    cols, rows = col.round() + offsets.view(1, 1, 1, -1), row.round() + offsets.view(1, 1, -1, 1)
    sigma_px = (sigma * scale / pixel)[..., None, None]
    w = weight[..., None, None] * torch.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * sigma_px ** 2))
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    flat = (rows.clamp(0, size - 1) * size + cols.clamp(0, size - 1)).long()
    out = torch.zeros(n, size * size)
    out.scatter_add_(1, flat.reshape(n, -1), (w * inside).reshape(n, -1))
    return out.view(n, size, size)


def render_faces(identity: dict[str, Tensor], nuisance: dict[str, Tensor], size: int = 112) -> Tensor:
    """Draw N faces: identity and nuisance hold per-image parameters (first dim N). Returns uint8 (N,3,size,size)."""
    n = nuisance["angle"].shape[0]
    pixel = 2.0 / size
    e = lambda t: t.view(n, 1, 1)                          # noqa: E731  per-image scalar -> broadcastable
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) * pixel - 1.0
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = x.expand(n, size, size), y.expand(n, size, size)
    # Image -> face frame: undo shift, rotation and scale.
    scale = torch.exp(e(nuisance["log_scale"]))
    cos, sin = torch.cos(e(nuisance["angle"])), torch.sin(e(nuisance["angle"]))
    xs, ys = x - e(nuisance["shift_x"]), y - e(nuisance["shift_y"])
    u, v = (cos * xs + sin * ys) / scale, (-sin * xs + cos * ys) / scale
    pixel = pixel / scale   # per image: edges stay about a pixel wide in the image, whatever the batch

    ip = {k: e(t) if t.dim() == 1 else t for k, t in identity.items()}
    bg = torch.stack([nuisance["bg_r"], nuisance["bg_g"], nuisance["bg_b"]], 1)
    canvas = bg[:, :, None, None] * (1.0 - 0.25 * (y[:, None] + 1) / 2)
    hair_colour = ip["hair_tone"].view(n, 1) * torch.tensor([1.0, 0.8, 0.6])
    face_cv = 0.08
    hair = _ellipse(u, v, 0.0, face_cv - ip["hair_up"], ip["face_a"] * 1.1, ip["face_b"] * 0.95, pixel)
    canvas = _blend(canvas, hair, hair_colour)

    # Skin: tone and hue (coarse) times a micro-texture of gratings (fine).
    tone, hue = ip["skin_tone"].view(n, 1), ip["skin_hue"].view(n, 1)
    skin = (tone * torch.tensor([1.0, 0.80, 0.66]) + hue * torch.tensor([1.0, 0.0, -1.0])).clamp(0, 1)
    ang, k, ph = identity["wave_angle"], identity["wave_k"], identity["wave_phase"]   # (N, W)
    proj = u[:, None] * torch.cos(ang)[..., None, None] + v[:, None] * torch.sin(ang)[..., None, None]
    texture = torch.sin(proj * k[..., None, None] + ph[..., None, None]).sum(1) * (TEXTURE_AMPLITUDE / TEXTURE_WAVES)
    # Moles: small dark spots at fixed places of the face.
    marks = _splat_spots(identity["mole_u"] * identity["face_a"][:, None],
                         face_cv + identity["mole_v"] * identity["face_b"][:, None], identity["mole_dark"],
                         MOLE_SIGMA, nuisance, size).clamp(max=0.8)
    skin_px = skin[:, :, None, None] * (1 + texture[:, None]) * (1 - marks[:, None])
    face = _ellipse(u, v, 0.0, face_cv, ip["face_a"], ip["face_b"], pixel)
    canvas = _blend(canvas, face, skin_px)

    # Left and right features are mirror images: draw on |u|.
    au = u.abs()
    eye_h = ip["eye_h"] * e(nuisance["eye_open"])
    brow_v = v - (ip["eye_y"] - ip["brow_gap"]) - ip["brow_tilt"] * (au - ip["eye_x"])
    brow = _ellipse(au, brow_v, ip["eye_x"], 0.0, ip["eye_w"] * 1.25, torch.full_like(eye_h, 0.022), pixel)
    canvas = _blend(canvas, brow * face, hair_colour * 0.8)
    sclera = _ellipse(au, v, ip["eye_x"], ip["eye_y"], ip["eye_w"], eye_h, pixel, ip["eye_power"])
    canvas = _blend(canvas, sclera * face, torch.full((n, 3), 0.92))
    iris_colour = torch.stack([identity["iris_r"], identity["iris_g"], identity["iris_b"]], 1)
    iris_r = ip["eye_h"] * 0.95
    iris = _ellipse(au, v, ip["eye_x"], ip["eye_y"], iris_r, iris_r, pixel) * sclera
    canvas = _blend(canvas, iris * face, iris_colour)
    pupil = _ellipse(au, v, ip["eye_x"], ip["eye_y"], iris_r * 0.4, iris_r * 0.4, pixel) * sclera
    canvas = _blend(canvas, pupil * face, torch.full((n, 3), 0.05))

    # Nose: a shaded ridge and two nostrils.
    nose_top, nose_bottom = ip["eye_y"], ip["eye_y"] + ip["nose_len"]
    along = ((v - nose_top) / (nose_bottom - nose_top)).clamp(0, 1)
    ridge = torch.exp(-(u - 0.03) ** 2 / (2 * 0.02 ** 2)) * torch.sigmoid((v - nose_top) / pixel) \
        * torch.sigmoid((nose_bottom - v) / pixel) * along * 0.25
    nostrils = _ellipse(au, v, torch.full_like(nose_bottom, 0.045), nose_bottom, torch.full_like(nose_bottom, 0.022),
                        torch.full_like(nose_bottom, 0.013), pixel) * 0.6
    canvas = canvas * (1 - (ridge + nostrils)[:, None] * face[:, None])

    # Mouth: a curved lip band (smile bends it), dark opening when the mouth is open.
    curve = v - ip["mouth_y"] + e(nuisance["smile"]) * 0.5 * (u / ip["mouth_w"]).pow(2) * 0.06
    lips_h = 0.05 + 0.04 * e(nuisance["mouth_open"])
    upper = ip["lip_ratio"]
    lip_v = torch.where(curve < 0, curve / (2 * upper), curve / (2 * (1 - upper)))
    lip_v = lip_v + ip["lip_bow"] * torch.exp(-u.pow(2) / (2 * 0.03 ** 2)) * (curve < 0)
    lips = _ellipse(u, lip_v, 0.0, 0.0, ip["mouth_w"], lips_h * 0.5, pixel)
    lip_colour = ip["lip_tone"].view(n, 1) * torch.tensor([1.0, 0.45, 0.45])
    canvas = _blend(canvas, lips * face, lip_colour)
    opening_h = 0.028 * e(nuisance["mouth_open"]) + 1e-3
    opening = _ellipse(u, curve, 0.0, 0.0, ip["mouth_w"] * 0.8, opening_h, pixel)
    canvas = _blend(canvas, opening * lips * face, torch.full((n, 3), 0.08))

    # Light: a linear gradient, overall brightness and a colour cast; then sensor noise.
    light = e(nuisance["brightness"]) + e(nuisance["light_x"]) * x + e(nuisance["light_y"]) * y
    cast = 1 + torch.stack([nuisance["cast_r"], nuisance["cast_g"], nuisance["cast_b"]], 1)[:, :, None, None]
    canvas = canvas * light[:, None] * cast
    noise = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s)))
                         for s in nuisance["noise_seed"]])
    canvas = canvas + noise * nuisance["noise"].view(n, 1, 1, 1)
    return to_uint8(canvas.clamp(0, 1) * 2 - 1)


class SyntheticFaces(Dataset):
    """SYNTHETIC identities k in [first_identity, first_identity + num_identities), images_per_identity each.

    Items are (image (3, size, size) float32 in [-1, 1], label, index) like IdentityFolderDataset; the
    label counts from 0 within this set. Everything is rendered at construction (uint8, chunked).
    """

    def __init__(self, num_identities: int, images_per_identity: int, seed: int = 0, image_size: int = 112,
                 first_identity: int = 0, chunk: int = 64, pixels: Tensor | None = None):
        for name, value in (("num_identities", num_identities), ("images_per_identity", images_per_identity),
                            ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(first_identity, bool) or not isinstance(first_identity, int) or first_identity < 0:
            raise ValueError(f"first_identity must be an int >= 0, got {first_identity!r}")
        self.seed, self.image_size, self.first_identity = seed, image_size, first_identity
        self.name = f"{NAME}(seed={seed}, identities={first_identity}..{first_identity + num_identities - 1})"
        self.classes = [f"synthetic_id{first_identity + k:05d}" for k in range(num_identities)]
        self.targets = torch.arange(num_identities).repeat_interleave(images_per_identity)
        self.samples = [(f"{self.classes[int(t)]}/{i % images_per_identity:04d}.png", int(t))
                        for i, t in enumerate(self.targets)]
        if pixels is not None:  # rendered before (by these arguments): gdrd_fast.demo.data's cache
            if pixels.dtype != torch.uint8 or tuple(pixels.shape) != (len(self.targets), 3, image_size, image_size):
                raise ValueError(f"pixels must be uint8 {(len(self.targets), 3, image_size, image_size)}, got "
                                 f"{pixels.dtype} {tuple(pixels.shape)}")
            self.pixels = pixels
            return
        identities = [identity_parameters(seed, first_identity + k) for k in range(num_identities)]
        nuisances = [nuisance_parameters(seed, first_identity + k, images_per_identity) for k in range(num_identities)]
        per_image_identity = _stack([identities[int(t)] for t in self.targets])
        nuisance = {k: torch.cat([p[k] for p in nuisances]) for k in nuisances[0]}
        self.pixels = torch.cat([
            render_faces({k: t[s:s + chunk] for k, t in per_image_identity.items()},
                         {k: t[s:s + chunk] for k, t in nuisance.items()}, image_size)
            for s in range(0, len(self.targets), chunk)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return from_uint8(self.pixels[index]), int(self.targets[index]), index

    def images(self) -> Tensor:
        """All images, (N, 3, size, size) float32 in [-1, 1]."""
        return from_uint8(self.pixels)


def sample_pairs(labels: Tensor, num_folds: int = 10, pairs_per_fold: int = 600, seed: int = 0) -> tuple[Tensor, Tensor]:
    """LFW-like pairs: identities split into `num_folds` disjoint groups; fold f holds pairs_per_fold/2
    same-identity pairs then as many different-identity pairs, all from group f.
    Returns (pairs (P, 2) of indices into `labels`, issame (P,) bool)."""
    if pairs_per_fold < 2 or pairs_per_fold % 2:
        raise ValueError(f"pairs_per_fold must be an even int >= 2, got {pairs_per_fold!r}")
    g = torch.Generator().manual_seed(seed)
    ids = labels.unique()
    if len(ids) < 2 * num_folds:
        raise ValueError(f"need at least 2 identities per fold ({2 * num_folds}), labels has {len(ids)}")
    groups = ids[torch.randperm(len(ids), generator=g)].tensor_split(num_folds)
    members = {int(k): (labels == k).nonzero().flatten() for k in ids}
    if min(len(m) for m in members.values()) < 2:
        raise ValueError("every identity needs at least 2 images for same-identity pairs")
    pairs, issame = [], []
    half = pairs_per_fold // 2
    for group in groups:
        for same in (True, False):
            for _ in range(half):
                if same:
                    k = int(group[torch.randint(len(group), (), generator=g)])
                    a, b = members[k][torch.randperm(len(members[k]), generator=g)[:2]]
                else:
                    k1, k2 = group[torch.randperm(len(group), generator=g)[:2]]
                    a = members[int(k1)][torch.randint(len(members[int(k1)]), (), generator=g)]
                    b = members[int(k2)][torch.randint(len(members[int(k2)]), (), generator=g)]
                pairs.append((int(a), int(b)))
                issame.append(same)
    return torch.tensor(pairs, dtype=torch.long), torch.tensor(issame)


def write_synthetic_dataset(root: str | os.PathLike, num_train_identities: int = 200, images_per_identity: int = 20,
                            num_test_identities: int = 100, test_images_per_identity: int = 10,
                            pairs_per_fold: int = 200, seed: int = 0, image_size: int = 112) -> dict[str, Path]:
    """Write the SYNTHETIC set as a real one would arrive: an identity-folder training tree, an
    insightface pairs .bin over disjoint test identities, and a JSON note. Returns their paths."""
    root = Path(root)
    train = SyntheticFaces(num_train_identities, images_per_identity, seed, image_size)
    test = SyntheticFaces(num_test_identities, test_images_per_identity, seed, image_size,
                          first_identity=num_train_identities)
    tree = root / "synthetic_faces_train"
    for (rel, _), pixels in zip(train.samples, train.pixels):
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encode_png(from_uint8(pixels)))
    pairs, issame = sample_pairs(test.targets, pairs_per_fold=pairs_per_fold, seed=seed)
    pairs_path = root / "synthetic_lfw_pairs.bin"
    write_pairs_bin(pairs_path, test.images()[pairs.flatten()], issame)
    note = {"synthetic": True, "name": NAME, "generator": "gdrd_fast.data.synthetic", "seed": seed,
            "image_size": image_size, "train": {"identities": num_train_identities, "images_per_identity":
                                                images_per_identity, "path": tree.name},
            "pairs": {"identities": num_test_identities, "pairs": len(issame), "path": pairs_path.name},
            "note": "SYNTHETIC face-like images drawn by gdrd_fast; not real faces, numbers on it are not "
                    "comparable with LFW/UCCS results."}
    note_path = root / "synthetic_dataset.json"
    atomic_write_bytes(note_path, json.dumps(note, indent=2).encode())
    return {"train": tree, "pairs": pairs_path, "metadata": note_path}
