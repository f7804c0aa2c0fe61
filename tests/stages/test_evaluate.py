import itertools
import math

from stepdapo.metrics import majority_correct, pass_at_k, wilson_interval


def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                outcomes = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(pass_at_k(n, c, k), brute)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0 and 0.1 < hi < 0.2


def test_majority():
    assert majority_correct(["3", "4", "3"], [True, False, True])
    assert not majority_correct(["4", "3", "4"], [False, True, False])
    assert not majority_correct([None, None], [False, False])
    assert majority_correct(["3", "4"], [True, False])  # tie: the first seen
