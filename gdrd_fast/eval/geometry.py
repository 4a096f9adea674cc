"""Feature geometry of trained networks on one labelled image set: how alike two feature spaces are
(linear CKA), how well identities separate (intra- vs inter-class cosine similarity, a linear probe),
and a 2-D picture of the embedding (PCA; t-SNE too when scikit-learn is installed).

Feature maps are flattened; every statistic is computed in float64.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .identification import linear_probe
from .report import markdown_table, save_png, write_json


def _matrix(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be a (N >= 2, ...) tensor of features, got {getattr(x, 'shape', type(x))}")
    x = x.detach().flatten(1).double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return x


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two feature sets on the same N inputs, in [0, 1]:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc; computed through the
    N x N Gram matrices, so wide feature maps cost no D x D matrix."""
    x, y = _matrix("x", x), _matrix("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same inputs: {x.shape[0]} rows against {y.shape[0]}")
    x, y = x - x.mean(0), y - y.mean(0)
    gx, gy = x @ x.T, y @ y.T
    denominator = gx.norm() * gy.norm()
    if denominator == 0:
        raise ValueError("linear CKA is undefined for constant features")
    return float((gx * gy).sum() / denominator)


def cosine_similarities(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine similarity of every pair i < j: (same-identity pairs, different-identity pairs)."""
    x = F.normalize(_matrix("features", features), dim=1)
    labels = torch.as_tensor(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must be ({x.shape[0]},), got {tuple(labels.shape)}")
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
    cos = (x @ x.T)[i, j]  # through the N x N Gram matrix: gathering rows per pair held N^2/2 x D (GBs for T_g)
    same = labels[i] == labels[j]
    return cos[same], cos[~same]


def separation(features: Tensor, labels: Tensor) -> dict[str, float]:
    """Intra- and inter-class cosine statistics and d' = (mean_intra - mean_inter) / pooled std."""
    intra, inter = cosine_similarities(features, labels)
    if intra.numel() < 2 or inter.numel() < 2:
        raise ValueError("need at least two same-identity and two different-identity pairs")
    pooled = ((intra.var() + inter.var()) / 2).sqrt()
    return {"intra_mean": float(intra.mean()), "intra_std": float(intra.std()), "inter_mean": float(inter.mean()),
            "inter_std": float(inter.std()), "d_prime": float((intra.mean() - inter.mean()) / pooled)}


def probe_split(labels: Tensor, train_fraction: float = 0.5) -> Tensor:
    """A boolean train mask: the first ceil(fraction * n) images of each identity (at least one left to test)."""
    labels = torch.as_tensor(labels)
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for label in labels.unique():
        where = (labels == label).nonzero().flatten()
        keep = min(len(where) - 1, max(1, round(train_fraction * len(where))))
        mask[where[:keep]] = True
    return mask


def probe_accuracy(features: Tensor, labels: Tensor, train_fraction: float = 0.5) -> float:
    """Linear-probe top-1 accuracy: fitted on part of each identity's images, tested on the rest."""
    x, labels = _matrix("features", features), torch.as_tensor(labels)
    train = probe_split(labels, train_fraction)
    return linear_probe(x[train], labels[train], x[~train], labels[~train])


def embed_2d(features: Tensor, method: str = "pca", seed: int = 0) -> Tensor:
    """(N, 2) coordinates: PCA (torch), or t-SNE (scikit-learn, PCA-initialised, seeded)."""
    x = _matrix("features", features)
    x = x - x.mean(0)
    if method == "pca":
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        return x @ v[:2].T
    if method == "tsne":
        if not has_sklearn():
            raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn")
        from sklearn.manifold import TSNE
        perplexity = float(min(30, max(2, (x.shape[0] - 1) // 3)))
        return torch.from_numpy(TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            x.numpy()))
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def has_sklearn() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def analyze_features(features: Mapping[str, Tensor], labels: Tensor, out_dir: str | os.PathLike, title: str,
                     cka_pairs: Mapping[str, tuple[str, str]] | None = None, note: str = "") -> dict:
    """Write geometry.json, geometry.md, cosine.png and embedding.png for named feature sets on one image set.

    cka_pairs: row name -> (feature set, feature set) to compare; default every pair.
    """
    if len(features) < 1:
        raise ValueError("features must name at least one feature set")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(features)
    if cka_pairs is None:
        cka_pairs = {f"{a} vs {b}": (a, b) for k, a in enumerate(names) for b in names[k + 1:]}
    cka = {row: linear_cka(features[a], features[b]) for row, (a, b) in cka_pairs.items()}
    stats = {name: separation(f, labels) | {"probe_accuracy": probe_accuracy(f, labels),
                                            "dim": int(f.flatten(1).shape[1])} for name, f in features.items()}
    rows = [{"features": name, "probe acc %": s["probe_accuracy"], "dim": s["dim"],
             "intra cos": f"{s['intra_mean']:.3f} +- {s['intra_std']:.3f}",
             "inter cos": f"{s['inter_mean']:.3f} +- {s['inter_std']:.3f}", "d'": f"{s['d_prime']:.2f}"}
            for name, s in stats.items()]
    md = [f"# Feature geometry: {title}", ""] + ([f"**{note}**", ""] if note else []) + [
        "Linear probe: a softmax classifier on frozen, L2-normalised features, fitted on half of each identity's "
        "images and tested on the rest. Cosines over all image pairs; d' = (intra - inter) / pooled std.", "",
        markdown_table(rows), ""]
    if cka:
        md += ["Linear CKA (1 = the same geometry up to rotation and scale):", "",
               markdown_table([{"pair": row, "CKA": f"{value:.3f}"} for row, value in cka.items()]), ""]
    paths = {"markdown": out / "geometry.md", "json": out / "geometry.json", "cosine": out / "cosine.png",
             "embedding": out / "embedding.png"}
    paths["markdown"].write_text("\n".join(md))
    write_json(paths["json"], {"title": title, "note": note, "features": stats, "cka": cka})
    _plot_cosines(paths["cosine"], features, labels, title)
    _plot_embeddings(paths["embedding"], features, labels, title)
    return {"features": stats, "cka": cka, "paths": paths, "markdown": "\n".join(md)}


def _figure(n_plots: int, width: float = 3.6, height: float = 3.0):
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    cols = min(4, n_plots)
    rows = (n_plots + cols - 1) // cols
    return Figure(figsize=(width * cols, height * rows), dpi=100), rows, cols


def _plot_cosines(path: Path, features: Mapping[str, Tensor], labels: Tensor, title: str) -> None:
    fig, rows, cols = _figure(len(features))
    for k, (name, f) in enumerate(features.items()):
        intra, inter = cosine_similarities(f, labels)
        ax = fig.add_subplot(rows, cols, k + 1)
        bins = torch.linspace(-1, 1, 61).tolist()
        ax.hist(inter.numpy(), bins=bins, density=True, alpha=0.6, label="different identity")
        ax.hist(intra.numpy(), bins=bins, density=True, alpha=0.6, label="same identity")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("cosine similarity", fontsize=8)
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"Intra- vs inter-class cosine, {title}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def _plot_embeddings(path: Path, features: Mapping[str, Tensor], labels: Tensor, title: str) -> None:
    methods = ["pca"] + (["tsne"] if has_sklearn() else [])
    fig, rows, cols = _figure(len(features) * len(methods))
    labels = torch.as_tensor(labels)
    k = 0
    for method in methods:
        for name, f in features.items():
            xy = embed_2d(f, method)
            ax = fig.add_subplot(rows, cols, k + 1)
            ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), c=labels.numpy(), cmap="tab20", s=6)
            ax.set_title(f"{name} ({method.upper()})", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            k += 1
    fig.suptitle(f"2-D embeddings coloured by identity, {title}", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)
