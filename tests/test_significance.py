"""Paired per-seed comparisons: t and bootstrap intervals, the paired t-test, reference tables and formatting."""
import json
import numpy as np
import pytest
from scipy import stats
from rs_prompt_lab.core import ConfigError, DataError
from rs_prompt_lab.metrics import paired_difference, compare_to_reference, format_difference

A = {0: 0.842, 1: 0.851, 2: 0.836, 3: 0.858, 4: 0.847}
B = {0: 0.829, 1: 0.840, 2: 0.831, 3: 0.842, 4: 0.835}


def test_t_interval_and_p_against_scipy():
    r = paired_difference(A, B, confidence=0.9)
    a, b = np.array(list(A.values())), np.array(list(B.values()))
    d = a - b
    lo, hi = stats.t.interval(0.9, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(len(d)))
    assert r["n"] == 5 and r["seeds"] == [0, 1, 2, 3, 4] and r["method"] == "t" and r["confidence"] == 0.9
    assert r["mean"] == pytest.approx(d.mean()) and r["std"] == pytest.approx(d.std(ddof=1))
    assert r["ci"] == pytest.approx([lo, hi]) and r["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["mean_a"] == pytest.approx(a.mean()) and r["mean_b"] == pytest.approx(b.mean())
    assert r["excludes_zero"] and r["fraction"]
    json.dumps(r, allow_nan=False)
    wide = paired_difference(A, B, confidence=0.99)
    assert wide["ci"][0] < r["ci"][0] and wide["ci"][1] > r["ci"][1]
    # dict order does not matter; sequences are aligned by position
    assert paired_difference(dict(reversed(list(A.items()))), B)["ci"] == pytest.approx(paired_difference(A, B)["ci"])
    assert paired_difference(list(A.values()), list(B.values()))["ci"] == paired_difference(A, B)["ci"]


def test_shift_excludes_zero_noise_does_not():
    rng = np.random.default_rng(0)
    base = 0.80 + 0.02 * rng.standard_normal(8)
    shifted = paired_difference(base + 0.03 + 0.002 * rng.standard_normal(8), base)
    assert shifted["excludes_zero"] and shifted["ci"][0] > 0 and shifted["p_value"] < 1e-4
    worse = paired_difference(base, base + 0.03 + 0.002 * rng.standard_normal(8))
    assert worse["excludes_zero"] and worse["ci"][1] < 0
    noise = paired_difference(base + 0.01 * rng.standard_normal(8), base + 0.01 * rng.standard_normal(8))
    assert not noise["excludes_zero"] and noise["ci"][0] < 0 < noise["ci"][1] and noise["p_value"] > 0.05
    for m in ("t", "bootstrap"):
        assert paired_difference(base + 0.03, base + 0.002 * rng.standard_normal(8), method=m)["excludes_zero"]


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(3)
    a, b = 0.8 + 0.02 * rng.standard_normal(20), 0.79 + 0.02 * rng.standard_normal(20)
    r1 = paired_difference(a, b, method="bootstrap", seed=7)
    assert r1 == paired_difference(a, b, method="bootstrap", seed=7)
    assert r1["ci"] != paired_difference(a, b, method="bootstrap", seed=8)["ci"]
    assert r1["method"] == "bootstrap" and r1["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    t = paired_difference(a, b)
    assert r1["ci"] == pytest.approx(t["ci"], abs=0.005)                       # n = 20: close to the t interval
    assert paired_difference(a, b, method="bootstrap", seed=7, n_boot=500)["ci"] != r1["ci"]


def test_degenerate_differences():
    same = paired_difference([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert same["ci"] == pytest.approx([0.1, 0.1]) and same["std"] == 0.0 and same["p_value"] == 0.0 and same["excludes_zero"]
    zero = paired_difference({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6}, method="bootstrap")
    assert zero["ci"] == [0.0, 0.0] and zero["p_value"] == 1.0 and not zero["excludes_zero"]
    json.dumps(zero, allow_nan=False)


def test_bad_inputs():
    with pytest.raises(DataError, match=r"only in a: \[2\], only in b: \[7\]"):
        paired_difference({0: .8, 1: .9, 2: .7}, {0: .8, 1: .85, 7: .6})
    loose = paired_difference({0: .8, 1: .9, 2: .7}, {0: .7, 1: .85, 7: .6}, strict=False)
    assert loose["seeds"] == [0, 1] and loose["dropped_seeds"] == [2, 7] and loose["n"] == 2
    for a, b, match in [({0: .8, 1: .9}, {0: .8, 3: .9}, "seed sets differ"), ([.8], [.7], "needs at least 2"),
                        ([], [], "needs at least 2"), ([.8, .9], [.7], "a has 2 values but b has 1"),
                        ({0: .8, 1: .9}, [.8, .9], "both as"), ([.8, np.inf], [.7, .8], "non-finite"),
                        (["x", "y"], [.7, .8], "must be numbers"), ([[.8, .1], [.9, .2]], [[.7, .1], [.8, .2]], "one number per seed")]:
        with pytest.raises(DataError, match=match):
            paired_difference(a, b)
    with pytest.raises(DataError, match="needs at least 2"):
        paired_difference({0: .8, 1: .9}, {0: .8, 3: .9}, strict=False)
    for kw, match in [(dict(method="wilcoxon"), "unknown interval method"), (dict(confidence=1.0), "confidence must be"),
                      (dict(method="bootstrap", n_boot=10), "n_boot must be")]:
        with pytest.raises(ConfigError, match=match):
            paired_difference(A, B, **kw)


def test_compare_to_reference_and_format():
    runs = {"coop": {s: {"oa": B[s], "aa": B[s] - .02, "kappa": B[s] - .05} for s in B},
            "cfipt": {s: {"oa": A[s], "aa": A[s] - .01, "kappa": A[s] - .04} for s in A},
            "rf": {s: {"oa": .7 + .001 * s, "aa": .6, "kappa": .5, "per_class": {"road": .4}} for s in A}}
    out = compare_to_reference(runs, "coop")
    assert set(out) == {"cfipt", "rf"} and set(out["cfipt"]) == {"oa", "aa", "kappa"}
    assert out["cfipt"]["oa"] == paired_difference(A, B)
    assert out["cfipt"]["aa"]["mean"] == pytest.approx(paired_difference(A, B)["mean"] + .01)
    assert out["rf"]["oa"]["mean"] < 0 and out["rf"]["oa"]["excludes_zero"]
    assert compare_to_reference(runs, "coop", "oa", method="bootstrap", seed=1)["rf"]["oa"]["method"] == "bootstrap"
    with pytest.raises(ConfigError, match="Did you mean: coop"):
        compare_to_reference(runs, "coopp")
    with pytest.raises(DataError, match="method 'coop' has no metric 'per_class.road'"):
        compare_to_reference(runs, "rf", ["per_class.road"])
    runs["cfipt"].pop(4)
    with pytest.raises(DataError, match=r"only in b: \[4\]"):
        compare_to_reference(runs, "coop")
    s = format_difference(out["cfipt"]["oa"])
    lo, hi = out["cfipt"]["oa"]["ci"]
    assert s == f"+{out['cfipt']['oa']['mean'] * 100:.2f} [+{lo * 100:.2f}, +{hi * 100:.2f}] pts (n=5)"
    assert format_difference({"mean": .0123, "ci": [-.004, .0286], "n": 5, "fraction": True}) == "+1.23 [−0.40, +2.86] pts (n=5)"
    assert format_difference({"mean": 12.5, "ci": [-1.0, 26.0], "n": 4, "fraction": False}) == "+12.50 [−1.00, +26.00] (n=4)"
    assert format_difference({"mean": .5, "ci": [.25, .75], "n": 3, "p_value": 0.0123}, scale=1, digits=1, p=True) == "+0.5 [+0.2, +0.8] (n=3, p=0.0123)"
