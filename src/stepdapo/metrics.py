"""Statistics as pure functions of plain numbers: intervals (Wilson, bootstrap, grouped
bootstrap over problems), pass@k and majority votes for evaluation, and the value-model quality
metrics (BCE, Brier, ECE, AUC, calibration by Platt scaling, cross-fitted). No models, no files:
each has a CPU test against a plain reference (tests/stages/test_evaluate.py, tests/test_losses.py,
tests/stages/test_critic.py). The stages that report them: stages/evaluate.py, stages/critic.py."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np

# -- evaluation ------------------------------------------------------------------------------------

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # exact at the ends: the rounding error of centre +- half must not exclude p itself
    return (0.0 if successes == 0 else lo, 1.0 if successes == n else hi)


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-problem values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn without replacement from n) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], gold_ok: list[bool]) -> bool:
    """Is the most frequent non-empty answer a correct one? Ties go to the first seen."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return False
    best = max(counts.values())
    top = next(a for a in answers if a is not None and counts[a] == best)
    return gold_ok[answers.index(top)]


# -- value-model quality ---------------------------------------------------------------------------

def bce(pred, target) -> float:
    p = np.clip(np.asarray(pred, float), 1e-6, 1 - 1e-6)
    t = np.asarray(target, float)
    return float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())


def brier(pred, target) -> float:
    return float(((np.asarray(pred, float) - np.asarray(target, float)) ** 2).mean())


def calibration_bins(pred, target, n_bins: int = 10) -> list[dict]:
    p, t = np.asarray(pred, float), np.asarray(target, float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    return [{"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": int((bins == b).sum()),
             "mean_pred": float(p[bins == b].mean()) if (bins == b).any() else None,
             "mean_target": float(t[bins == b].mean()) if (bins == b).any() else None}
            for b in range(n_bins)]


def ece(pred, target, n_bins: int = 10) -> float:
    n = len(pred)
    return float(sum(b["n"] / n * abs(b["mean_pred"] - b["mean_target"])
                     for b in calibration_bins(pred, target, n_bins) if b["n"]))


def auc(scores, positive) -> float | None:
    """Area under the ROC curve (ties count one half): P(score of a positive > score of a negative)."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_bootstrap_interval(numerators, denominators, groups, n_boot: int = 2000, seed: int = 0
                               ) -> tuple[float, float]:
    """95% percentile bootstrap interval of sum(numerators) / sum(denominators), resampling whole
    groups (problems) with replacement: the states and sibling pairs of one problem are not
    independent, so resampling them one by one would give too narrow an interval."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    keys, idx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    g_num, g_den = np.bincount(idx, num, len(keys)), np.bincount(idx, den, len(keys))
    picks = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    ratios = g_num[picks].sum(1) / np.maximum(g_den[picks].sum(1), 1e-12)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def quality(pred, target, baseline: float, groups=None) -> dict:
    """Each metric for the critic and for the constant prediction `baseline`; with `groups` (each
    state's problem id), the BCE and Brier gains over the constant with their 95% intervals over
    problems."""
    if len(target) == 0:  # e.g. a tiny run whose held-out problems left no states
        return {"n": 0, **{k: None for k in ("bce", "bce_constant", "bce_gain", "bce_gain_ci95", "brier",
                                              "brier_constant", "brier_gain", "brier_gain_ci95", "ece",
                                              "ece_constant", "auc_mc0_vs_positive", "auc_constant")},
                "calibration": []}
    const = [baseline] * len(target)
    positive = [t > 0 for t in target]
    gain = {}
    if groups is not None:
        for name, loss in (("bce", bce), ("brier", brier)):
            per_state = [loss([c], [t]) - loss([p], [t]) for p, c, t in zip(pred, const, target)]
            gain[f"{name}_gain"] = float(np.mean(per_state))
            gain[f"{name}_gain_ci95"] = list(grouped_bootstrap_interval(per_state, [1.0] * len(per_state), groups))
    return {
        "n": len(target),
        "bce": bce(pred, target), "bce_constant": bce(const, target), **gain,
        "brier": brier(pred, target), "brier_constant": brier(const, target),
        "ece": ece(pred, target), "ece_constant": ece(const, target),
        "auc_mc0_vs_positive": auc(pred, positive), "auc_constant": 0.5,
        "calibration": calibration_bins(pred, target),
    }


MIN_CALIBRATION_STATES = 40  # fewer held-out states than this: no map is fitted


def _logit(v) -> np.ndarray:
    p = np.clip(np.asarray(v, float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_platt(values, targets, iters: int = 100) -> tuple[float, float] | None:
    """(a, b) minimising the BCE of sigmoid(a * logit(v) + b) against the soft targets (Platt
    scaling, by Newton's method on the two parameters); None when the best slope is not positive
    (values that rank states the wrong way round are not made right by a map that keeps ranks)."""
    z, t = _logit(values), np.asarray(targets, float)
    a, b = 1.0, 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(a * z + b)))
        w = p * (1 - p) + 1e-9
        g = np.array([((p - t) * z).sum(), (p - t).sum()])
        h = np.array([[(w * z * z).sum() + 1e-6, (w * z).sum()], [(w * z).sum(), w.sum() + 1e-6]])
        step = np.linalg.solve(h, g)
        step *= min(1.0, 2.0 / max(np.abs(step).max(), 1e-12))  # damped: no overshoot from a far start
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-9:
            break
    return (float(a), float(b)) if a > 0 else None


def apply_platt(values, ab: tuple[float, float]) -> list[float]:
    return (1 / (1 + np.exp(-(ab[0] * _logit(values) + ab[1])))).tolist()


def cross_fitted_calibration(pred, target, groups) -> tuple[list[float] | None, tuple[float, float] | None]:
    """(each held-out state's calibrated value from a map fitted on the OTHER half of the held-out
    problems, the map fitted on all of them): the first is what the check may judge honestly, the
    second is reported. (None, None) with too few states or a map that is not increasing."""
    if len(target) < MIN_CALIBRATION_STATES:
        return None, None
    fold = np.array([int(hashlib.sha1(f"calibration/{g}".encode()).hexdigest()[:8], 16) % 2 for g in groups])
    if fold.min() == fold.max():
        return None, None
    pred, target = np.asarray(pred, float), np.asarray(target, float)
    out = np.empty(len(target))
    for f in (0, 1):
        ab = fit_platt(pred[fold != f], target[fold != f])
        if ab is None:
            return None, None
        out[fold == f] = apply_platt(pred[fold == f], ab)
    return out.tolist(), fit_platt(pred, target)


# -- process reward models: ProcessBench's protocol ---------------------------------------------------
# A solution's label is the index of its earliest wrong step, -1 when every step is right. A PRM
# predicts the first step it scores below a threshold (-1: none). Scored separately on erroneous
# solutions (the predicted index must equal the label) and on correct ones (it must be -1); F1 is
# their harmonic mean (Zheng et al. 2024, ProcessBench).

def earliest_below(values, threshold: float) -> int:
    """Index of the first value below `threshold`; -1 if there is none."""
    return next((i for i, v in enumerate(values) if v < threshold), -1)


def processbench_scores(predicted: list[int], labels: list[int]) -> dict:
    """Accuracy on erroneous and on correct solutions (95% Wilson intervals) and their harmonic mean."""
    err = [p == y for p, y in zip(predicted, labels) if y != -1]
    ok = [p == -1 for p, y in zip(predicted, labels) if y == -1]
    acc_err = sum(err) / len(err) if err else None
    acc_ok = sum(ok) / len(ok) if ok else None
    f1 = (2 * acc_err * acc_ok / (acc_err + acc_ok) if acc_err is not None and acc_ok is not None
          and acc_err + acc_ok > 0 else 0.0 if acc_err is not None and acc_ok is not None else None)
    return {"n_erroneous": len(err), "n_correct": len(ok),
            "acc_erroneous": acc_err, "acc_erroneous_ci95": list(wilson_interval(sum(err), len(err))),
            "acc_correct": acc_ok, "acc_correct_ci95": list(wilson_interval(sum(ok), len(ok))), "f1": f1}


def best_threshold(step_values: list[list[float]], labels: list[int], centre: float = 0.5) -> float:
    """The threshold with the highest ProcessBench F1 on these solutions (ties: the one nearest
    `centre`), among the midpoints between consecutive distinct step scores and the ends."""
    points = np.unique(np.concatenate([np.asarray(v, float) for v in step_values if len(v)] or [np.array([0.5])]))
    if len(points) > 400:  # the F1 moves in steps; 400 quantiles resolve it well enough
        points = np.unique(np.quantile(points, np.linspace(0, 1, 400)))
    candidates = np.concatenate([[points[0] - 1e-6], (points[1:] + points[:-1]) / 2, [points[-1] + 1e-6]])
    best, best_key = 0.5, None
    for t in candidates:
        f1 = processbench_scores([earliest_below(v, t) for v in step_values], labels)["f1"] or 0.0
        key = (f1, -abs(t - centre))
        if best_key is None or key > best_key:
            best, best_key = float(t), key
    return best


# -- process reward models at test time: best-of-N and weighted votes --------------------------------

def best_of_n_correct(scores: list[float], correct: list[bool]) -> bool:
    """Is the highest-scored sample correct? (Ties: the first of them.)"""
    return bool(correct[int(np.argmax(scores))]) if scores else False


def weighted_vote_correct(answers: list[str | None], weights: list[float], correct: list[bool]) -> bool:
    """Is the answer with the largest total weight correct? Samples without an answer do not vote;
    ties go to the answer seen first."""
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + w
    if not totals:
        return False
    best = max(totals.values())
    top = next(a for a in answers if a is not None and totals[a] == best)
    return bool(correct[answers.index(top)])
