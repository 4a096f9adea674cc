import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gdrd_fast.eval import (extract_embeddings, kfold_contiguous, roc_curve, verification_rows, verify,
                            verify_embeddings)
from gdrd_fast.eval.report import resolution_note, roc_figure


def _pairs_with_distances(distances):
    """Unit 2-D embeddings whose squared L2 distance is exactly each of `distances` (up to rounding)."""
    d = torch.tensor(distances, dtype=torch.float64)
    theta = torch.arccos(1 - d / 2)
    e1 = torch.stack([torch.ones_like(d), torch.zeros_like(d)], 1)
    e2 = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    return e1, e2


def test_hand_computed_two_folds():
    # fold 0 = pairs 0,1; fold 1 = pairs 2,3.
    # Fold 0 trains on (1.005 same, 2.995 diff): thresholds 1.01..2.99 all perfect -> first = 1.01;
    #   held-out: 0.505 < 1.01 (same, right), 1.495 >= 1.01 (diff, right) -> 1.0.
    # Fold 1 trains on (0.505 same, 1.495 diff): 0.51..1.49 perfect -> first = 0.51;
    #   held-out: 1.005 >= 0.51 (said diff, wrong), 2.995 (right) -> 0.5. A last-on-ties rule gives 1.0.
    e1, e2 = _pairs_with_distances([0.505, 1.495, 1.005, 2.995])
    r = verify(e1, e2, [True, False, True, False], n_folds=2)
    assert r.fold_thresholds == pytest.approx([1.01, 0.51])
    assert r.fold_accuracies == [1.0, 0.5]
    assert r.accuracy == 0.75
    assert r.accuracy_std == pytest.approx(0.25)      # ddof=0 (ddof=1 would be 0.354)


def test_fold_boundaries_6000_and_uneven():
    folds = kfold_contiguous(6000)
    assert [(int(t[0]), int(t[-1])) for _, t in folds] == [(600 * k, 600 * k + 599) for k in range(10)]
    for train, test in folds:
        assert len(train) + len(test) == 6000 and not set(train) & set(test)
    # sklearn KFold(10, shuffle=False): the first n % 10 folds are one longer.
    sizes = [len(t) for _, t in kfold_contiguous(6007)]
    assert sizes == [601] * 7 + [600] * 3
    assert [len(t) for _, t in kfold_contiguous(13)] == [2, 2, 2] + [1] * 7
    assert np.array_equal(np.concatenate([t for _, t in kfold_contiguous(6007)]), np.arange(6007))
    with pytest.raises(ValueError, match="n_folds"):
        kfold_contiguous(5)


def test_folds_match_sklearn_when_installed():
    model_selection = pytest.importorskip("sklearn.model_selection")
    for n in (6000, 6007, 23):
        ours = kfold_contiguous(n)
        theirs = list(model_selection.KFold(10, shuffle=False).split(np.arange(n)))
        for (a_tr, a_te), (b_tr, b_te) in zip(ours, theirs):
            assert np.array_equal(a_tr, b_tr) and np.array_equal(a_te, b_te)


def _brute_force(dist, issame, far_target):
    """Loop-by-loop restatement of docs/method/evaluation.md (independent of the vectorised code)."""
    n = len(dist)
    sizes = [n // 10 + (1 if k < n % 10 else 0) for k in range(10)]
    starts = np.cumsum([0] + sizes)
    thresholds = [k / 100 for k in range(400)]
    accs, tars = [], []
    for k in range(10):
        test = list(range(starts[k], starts[k + 1]))
        train = [i for i in range(n) if i < starts[k] or i >= starts[k + 1]]
        best_t, best_acc = None, -1.0
        for t in thresholds:
            acc = sum((dist[i] < t) == issame[i] for i in train) / len(train)
            if acc > best_acc:                      # strict: keeps the first on ties
                best_t, best_acc = t, acc
        accs.append(sum((dist[i] < best_t) == issame[i] for i in test) / len(test))
        impostors = sorted(dist[i] for i in train if not issame[i])
        allowed = math.floor(far_target * len(impostors) + 1e-9)
        t_far = impostors[allowed] if allowed < len(impostors) else math.inf
        genuine = [i for i in test if issame[i]]
        tars.append(sum(dist[i] < t_far for i in genuine) / len(genuine))
    return np.mean(accs), np.std(accs), np.mean(tars)


@pytest.mark.parametrize("n_pairs", [300, 307])
def test_matches_brute_force(n_pairs):
    dim = 8
    e1 = F.normalize(torch.randn(n_pairs, dim, dtype=torch.float64), dim=1)
    issame = torch.rand(n_pairs) < 0.5
    noise = torch.randn(n_pairs, dim, dtype=torch.float64)
    e2 = torch.where(issame[:, None], F.normalize(e1 + 0.6 * noise, dim=1), F.normalize(noise, dim=1))
    dist = ((e1 - e2) ** 2).sum(1).numpy()
    acc, std, tar = _brute_force(dist, issame.numpy(), far_target=1e-2)
    r = verify(e1, e2, issame, far_target=1e-2)
    assert r.accuracy == pytest.approx(acc, abs=1e-12)
    assert r.accuracy_std == pytest.approx(std, abs=1e-12)
    assert r.tar == pytest.approx(tar, abs=1e-12)
    assert 0.6 < r.accuracy < 1.0            # the data is informative but not trivial


def test_separable_and_random():
    e1, e2 = _pairs_with_distances([0.2] * 50 + [3.0] * 50)
    issame = [True] * 50 + [False] * 50
    order = torch.randperm(100)
    r = verify(e1[order], e2[order], [issame[i] for i in order])
    assert r.accuracy == 1.0 and r.tar == 1.0 and r.far == 0.0 and r.auc == pytest.approx(1.0)
    n = 6000
    rand = F.normalize(torch.randn(2 * n, 64), dim=1)
    r = verify_embeddings(rand, torch.rand(n) < 0.5)
    assert abs(r.accuracy - 0.5) < 0.03 and abs(r.auc - 0.5) < 0.03


def test_roc_curve_exact_with_ties():
    fpr, tpr = roc_curve(np.array([0.1, 0.5, 0.5, 0.9]), np.array([True, True, False, False]))
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_bad_arguments():
    e = F.normalize(torch.randn(20, 4), dim=1)
    with pytest.raises(ValueError, match="issame"):
        verify(e, e, [1] * 20)
    with pytest.raises(ValueError, match="differ"):
        verify(e, e[:, :3], [True] * 20)
    with pytest.raises(ValueError, match="embeddings"):
        verify_embeddings(e[:19], [True] * 9)


class _NormChangingModel(torch.nn.Module):
    """Left-right asymmetric features whose norm depends on the flip, so the order of sum and
    normalise matters."""
    def forward(self, x):
        left, right = x[..., : x.shape[-1] // 2].mean((1, 2, 3)), x[..., x.shape[-1] // 2:].mean((1, 2, 3))
        return torch.stack([3 * left + 1, right - 2 * left, left * right + 0.5], 1)


def test_flip_sum_before_normalise():
    images = torch.rand(7, 3, 6, 6) * 2 - 1
    model = _NormChangingModel()
    got = extract_embeddings(model, images, batch_size=3)
    a, b = model(images), model(images.flip(-1))
    assert torch.allclose(got, F.normalize(a + b, dim=1), atol=1e-6)
    wrong = F.normalize(F.normalize(a, dim=1) + F.normalize(b, dim=1), dim=1)
    assert (got - wrong).abs().max() > 1e-3
    no_flip = extract_embeddings(model, images, flip=False, transform=lambda x: x * 0.5)
    assert torch.allclose(no_flip, F.normalize(model(images * 0.5), dim=1), atol=1e-6)


def _informative(n_pairs, seed=0):
    g = torch.Generator().manual_seed(seed)
    e1 = F.normalize(torch.randn(n_pairs, 8, generator=g, dtype=torch.float64), dim=1)
    issame = torch.arange(n_pairs) % 2 == 0
    noise = torch.randn(n_pairs, 8, generator=g, dtype=torch.float64)
    e2 = torch.where(issame[:, None], F.normalize(e1 + 0.6 * noise, dim=1), F.normalize(noise, dim=1))
    return e1, e2, issame


def test_tar_is_reported_at_the_far_the_impostors_resolve():
    # 600 pairs: 300 impostors, 270 in each 9-fold training split: FAR=1e-3 would accept 0.27 of a pair
    e1, e2, issame = _informative(600)
    r = verify(e1, e2, issame, far_target=1e-3)
    assert r.far_target == 1e-3 and r.far_level == pytest.approx(1 / 270) and r.num_impostors == 300
    dist = ((e1 - e2) ** 2).sum(1).numpy()
    assert r.tar == pytest.approx(_brute_force(dist, issame.numpy(), far_target=1 / 270)[2], abs=1e-12)
    assert list(verification_rows({"m": r})[0])[3] == "TAR@FAR=0.0037 %"
    assert "FAR=0.0037, not the 0.001 asked for" in resolution_note({"m": r})
    # 6000 pairs: 2700 impostors per training split resolve 1e-3, which is then what is reported
    big = verify(*_informative(6000, seed=1), far_target=1e-3)
    assert big.far_level == 1e-3 and resolution_note({"m": big}) == ""
    assert list(verification_rows({"m": big})[0])[3] == "TAR@FAR=0.001 %"
    rows = verification_rows({"small": r, "big": big})  # different levels: each row says its own
    assert [(row["TAR %"], row["at FAR"]) for row in rows] == [(r.tar, "0.0037"), (big.tar, "0.001")]


def test_multi_set_report_labels_each_tar_with_its_far(tmp_path):
    from gdrd_fast.eval.protocols import write_sets_report

    small, big = verify(*_informative(600)), verify(*_informative(6000, seed=1))
    paths = write_sets_report(tmp_path, {"small.bin": {"16x16": small}, "big.bin": {"16x16": big}})
    table = [line.split("|")[1:-1] for line in paths["markdown"].read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0]]
    far = header.index("at FAR")
    assert [row[far].strip() for row in table[2:]] == ["0.0037", "0.001"] and "TAR %" in header


def test_roc_figure_starts_at_the_resolvable_far_with_the_legend_off_the_axes():
    results = {"a": verify(*_informative(600)), "b": verify(*_informative(600, seed=2))}
    fig = roc_figure(results, "ROC on test pairs")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == pytest.approx(1 / 300) and ax.get_xscale() == "log"
    assert "false accept rate" in ax.get_xlabel() and "true accept rate" in ax.get_ylabel()
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.y1 < ax.get_window_extent().y0  # below the axes: covers no curve
    assert len(ax.get_legend().get_texts()) == 3  # two models and the FAR of the TAR column
