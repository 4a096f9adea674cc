"""gdrd_fast.eval.geometry: linear CKA against its feature-space formula, cosine splits, probe, 2-D plots."""
import pytest
import torch

from gdrd_fast.eval.geometry import (analyze_features, cosine_similarities, embed_2d, has_sklearn, linear_cka,
                                     probe_accuracy, probe_split, separation)


def cka_feature_space(x, y):
    """Kornblith et al.'s definition, in feature space: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@pytest.mark.parametrize("n, d1, d2", [(7, 3, 11), (33, 17, 5), (50, 64, 64)])
def test_linear_cka_matches_the_feature_space_formula_and_its_invariances(n, d1, d2):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, d1, generator=g), torch.randn(n, d2, generator=g)
    assert linear_cka(x, y) == pytest.approx(cka_feature_space(x, y), rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(d1, d1, generator=g, dtype=torch.float64))
    assert linear_cka(x, (x.double() @ q) * 3.7 + 2) == pytest.approx(1.0, abs=1e-10)  # rotation, scale, shift
    assert linear_cka(x.view(n, 1, d1), x) == pytest.approx(1.0, abs=1e-12)  # feature maps are flattened
    assert 0.0 <= linear_cka(x, y) <= 1.0
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(n, 2), y)
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(x.index_fill(0, torch.tensor([0]), float("nan")), y)


def test_cosines_split_pairs_by_identity_and_separation_is_dprime():
    labels = torch.tensor([0, 0, 1, 1, 1])
    x = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1], [0, 2]])
    intra, inter = cosine_similarities(x, labels)
    assert intra.numel() == 1 + 3 and inter.numel() == 2 * 3
    normed = torch.nn.functional.normalize(x.double(), dim=1)
    assert intra.min() == pytest.approx(float(normed[2] @ normed[3]))
    s = separation(x, labels)
    pooled = ((intra.var() + inter.var()) / 2).sqrt()
    assert s["d_prime"] == pytest.approx(float((intra.mean() - inter.mean()) / pooled))
    with pytest.raises(ValueError, match="labels must be"):
        cosine_similarities(x, labels[:-1])


def test_probe_split_and_probe_accuracy():
    labels = torch.arange(4).repeat_interleave(5)
    train = probe_split(labels)
    assert all(train[labels == k].sum() in (2, 3) and (~train[labels == k]).sum() >= 2 for k in range(4))
    centres = torch.eye(4) * 10
    g = torch.Generator().manual_seed(0)
    separable = centres[labels] + 0.1 * torch.randn(20, 4, generator=g)
    assert probe_accuracy(separable, labels) == 1.0
    noise = torch.randn(20, 4, generator=g)
    assert probe_accuracy(noise, labels) < 1.0


def test_embed_2d_and_analysis_outputs(tmp_path):
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(6)
    feats = {"a": torch.randn(30, 8, generator=g) + torch.eye(8)[labels] * 4, "b": torch.randn(30, 2, 3, 3, generator=g)}
    xy = embed_2d(feats["a"])
    assert xy.shape == (30, 2)
    centred = feats["a"].double() - feats["a"].double().mean(0)
    assert float(xy.var(0).sum()) == pytest.approx(float(torch.linalg.svdvals(centred)[:2].square().sum() / 29))
    if has_sklearn():
        assert embed_2d(feats["a"], "tsne").shape == (30, 2)
    with pytest.raises(ValueError, match="method"):
        embed_2d(feats["a"], "umap")
    result = analyze_features(feats, labels, tmp_path, "test", note="SYNTHETIC")
    assert set(result["cka"]) == {"a vs b"} and result["features"]["a"]["probe_accuracy"] > 0.5
    for name in ("cosine.png", "embedding.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "SYNTHETIC" in (tmp_path / "geometry.md").read_text() and (tmp_path / "geometry.json").is_file()
