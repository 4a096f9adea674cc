"""LFW-protocol verification (docs/method/evaluation.md; insightface eval/verification.py conventions).

Embeddings are L2-normalised; distance = squared L2 (0..4); thresholds 0, 0.01, ..., 3.99; a pair is
predicted "same" when distance < threshold. 10 contiguous folds (KFold(10, shuffle=False): the first
n % 10 folds hold one pair more). For each fold the threshold with the best accuracy on the other 9
folds is chosen (the first, i.e. smallest, on ties) and accuracy is measured on the held-out fold.
Reported: mean and std (ddof=0) of the 10 fold accuracies, and TAR@FAR.

TAR@FAR [choice]: per fold, the threshold is the largest one whose false accept rate on the other 9
folds is <= far (exactly: impostor distances sorted, at most floor(far * impostors) of them accepted),
then TAR and FAR are measured on the held-out fold; mean and std over folds. insightface interpolates
a threshold on a 0.001 grid instead; this form needs no interpolation and never exceeds the target
on the training folds.

The FAR is never finer than the data can resolve: with n impostor pairs in the smallest training split,
the smallest FAR above 0 is 1/n, so TAR is reported at far_level = max(far_target, 1/n) (300 impostor
pairs cannot show a TAR at FAR=1e-3: it is reported, and labelled, at FAR=3.7e-3). far_level is what
reports print; far_target is what was asked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

THRESHOLDS = np.arange(0, 4, 0.01)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz   # numpy 2 renamed it


def kfold_contiguous(n: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays like sklearn's KFold(n_folds, shuffle=False): contiguous test blocks,
    the first n % n_folds of them one longer."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"n_folds must be an int >= 2, got {n_folds!r}")
    if n < n_folds:
        raise ValueError(f"need at least n_folds={n_folds} pairs, got {n}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    stops = np.cumsum(sizes)
    idx = np.arange(n)
    return [(np.concatenate([idx[: stop - size], idx[stop:]]), idx[stop - size: stop])
            for size, stop in zip(sizes, stops)]


def _rates(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
    """Per threshold (rows): accuracy, TPR, FPR of `dist < t`."""
    predict = dist[None, :] < thresholds[:, None]
    tp = (predict & issame).sum(1)
    fp = (predict & ~issame).sum(1)
    tn = (~predict & ~issame).sum(1)
    positives, negatives = issame.sum(), (~issame).sum()
    tpr = tp / positives if positives else np.zeros(len(thresholds))
    fpr = fp / negatives if negatives else np.zeros(len(thresholds))
    return (tp + tn) / len(dist), tpr, fpr


def _threshold_at_far(impostor_dist: np.ndarray, far: float) -> float:
    """Largest threshold accepting (dist < t) at most floor(far * count) impostors."""
    if len(impostor_dist) == 0:
        return math.inf
    allowed = int(math.floor(far * len(impostor_dist) + 1e-9))
    ordered = np.sort(impostor_dist)
    return float(ordered[allowed]) if allowed < len(ordered) else math.inf


@dataclass
class VerificationResult:
    accuracy: float                 # mean over folds
    accuracy_std: float             # ddof = 0
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    far_target: float               # the FAR asked for
    far_level: float                # the FAR TAR is reported at: max(far_target, 1 / training impostors)
    tar: float                      # TAR@FAR=far_level, mean over folds
    tar_std: float
    far: float                      # the FAR measured on held-out folds, mean
    roc_fpr: list[float] = field(repr=False)   # exact ROC over all pairs, ascending FPR
    roc_tpr: list[float] = field(repr=False)
    auc: float = 0.0
    num_pairs: int = 0
    num_impostors: int = 0          # the ROC's FAR resolution is 1 / num_impostors

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC of `dist < t` over every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(dist, kind="stable")
    d, same = dist[order], issame[order]
    last_of_tie = np.r_[d[1:] != d[:-1], True]
    tp = np.cumsum(same)[last_of_tie]
    fp = np.cumsum(~same)[last_of_tie]
    tpr = np.r_[0.0, tp / max(same.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~same).sum(), 1)]
    return fpr, tpr


def pair_distances(embeddings1: Tensor, embeddings2: Tensor) -> np.ndarray:
    """Squared L2 distance of L2-normalised embeddings, float64."""
    for name, e in (("embeddings1", embeddings1), ("embeddings2", embeddings2)):
        if not isinstance(e, Tensor) or e.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (pairs, dim), got {getattr(e, 'shape', type(e))}")
    if embeddings1.shape != embeddings2.shape:
        raise ValueError(f"embeddings1 {tuple(embeddings1.shape)} and embeddings2 {tuple(embeddings2.shape)} differ")
    return (embeddings1.double() - embeddings2.double()).square().sum(1).cpu().numpy()


def verify(embeddings1: Tensor, embeddings2: Tensor, issame, n_folds: int = 10, far_target: float = 1e-3,
           thresholds: np.ndarray = THRESHOLDS) -> VerificationResult:
    """Verification of pairs (embeddings1[k], embeddings2[k]) with labels issame[k] (module docstring)."""
    dist = pair_distances(embeddings1, embeddings2)
    issame = np.asarray(issame.cpu() if isinstance(issame, Tensor) else issame)
    if issame.dtype != np.bool_ or issame.shape != dist.shape:
        raise ValueError(f"issame must be {len(dist)} bools, got dtype {issame.dtype}, shape {issame.shape}")
    if not 0 < far_target < 1:
        raise ValueError(f"far_target must be in (0, 1), got {far_target!r}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = kfold_contiguous(len(dist), n_folds)
    fewest_impostors = min(int((~issame[train]).sum()) for train, _ in folds)
    far_level = max(far_target, 1.0 / fewest_impostors) if fewest_impostors else 1.0
    accuracies, chosen, tars, fars = [], [], [], []
    for train, test in folds:
        train_acc, _, _ = _rates(dist[train], issame[train], thresholds)
        best = thresholds[int(np.argmax(train_acc))]        # argmax: the first maximum
        test_acc, _, _ = _rates(dist[test], issame[test], np.array([best]))
        accuracies.append(float(test_acc[0]))
        chosen.append(float(best))
        t_far = _threshold_at_far(dist[train][~issame[train]], far_level)
        _, tar, far = _rates(dist[test], issame[test], np.array([t_far]))
        tars.append(float(tar[0]))
        fars.append(float(far[0]))
    fpr, tpr = roc_curve(dist, issame)
    return VerificationResult(
        accuracy=float(np.mean(accuracies)), accuracy_std=float(np.std(accuracies)), fold_accuracies=accuracies,
        fold_thresholds=chosen, far_target=far_target, far_level=far_level, tar=float(np.mean(tars)),
        tar_std=float(np.std(tars)), far=float(np.mean(fars)), roc_fpr=fpr.tolist(), roc_tpr=tpr.tolist(),
        auc=float(_trapezoid(tpr, fpr)), num_pairs=len(dist), num_impostors=int((~issame).sum()))


def verify_embeddings(embeddings: Tensor, issame, **kwargs) -> VerificationResult:
    """insightface layout: embeddings of 2N images, pair k = (embeddings[2k], embeddings[2k+1])."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[0] % 2:
        raise ValueError(f"embeddings must be (2N, dim), got {getattr(embeddings, 'shape', type(embeddings))}")
    return verify(embeddings[0::2], embeddings[1::2], issame, **kwargs)
