"""Detection metrics of the split (tools/detection.py): AUROC, decision quality, the
authors' filtering rate and its scaled k, the combined report, BackdoorBench's DER."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tools.detection import (
    AUTHORS_FILTERING,
    AUTHORS_K,
    AUTHORS_TRAIN_SIZE,
    auroc,
    decision_quality,
    der,
    detection_report,
    filtering_rate,
    scaled_k,
)

T, F = True, False


def _brute_auroc(scores, poisoned) -> float:
    """Every (poisoned, clean) pair: 1 when the poisoned one scores higher, 1/2 on a tie."""
    pos = [s for s, p in zip(scores, poisoned) if p]
    neg = [s for s, p in zip(scores, poisoned) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


# ---- AUROC


def test_auroc_perfect_and_reversed():
    poisoned = [F, T, F, T, T]
    assert auroc([0.1, 0.9, 0.2, 0.8, 0.7], poisoned) == 1.0
    assert auroc([0.9, 0.1, 0.8, 0.2, 0.3], poisoned) == 0.0


def test_auroc_hand_case_with_tie():
    # poisoned: 0.9 (index 2), 0.5 (index 3); clean: 0.5, 0.1, 0.3.
    # Pairs: 0.9 beats all 3 clean -> 3; 0.5 ties 0.5 -> 1/2, beats 0.1 and 0.3 -> 2.
    # U = 5.5 of 2 * 3 = 6 pairs: AUROC = 11/12. (Ranks: 0.1->1, 0.3->2, 0.5,0.5->3.5,
    # 0.9->5; poisoned rank sum 8.5 - 2*3/2 = 5.5.)
    scores = [0.5, 0.1, 0.9, 0.5, 0.3]
    poisoned = [F, F, T, T, F]
    assert auroc(scores, poisoned) == pytest.approx(11 / 12)
    assert auroc(scores, np.array(poisoned, dtype=np.int64)) == pytest.approx(11 / 12)


def test_auroc_all_tied_is_half_and_empty_class_is_nan():
    assert auroc([2.0, 2.0, 2.0, 2.0], [T, F, F, T]) == 0.5
    assert math.isnan(auroc([0.1, 0.2, 0.3], [F, F, F]))
    assert math.isnan(auroc([0.1, 0.2, 0.3], [T, T, T]))
    assert math.isnan(auroc([], []))


def test_auroc_matches_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 8, size=300).astype(float)  # many ties
    poisoned = rng.random(300) < 0.2
    assert 0 < poisoned.sum() < 300
    expected = _brute_auroc(scores.tolist(), poisoned.tolist())
    assert auroc(scores, poisoned) == pytest.approx(expected, abs=1e-12)
    # float scores with a few exact ties, a different class balance
    scores = np.round(rng.normal(size=257) + 0.5 * (rng.random(257) < 0.5), 1)
    poisoned = rng.random(257) < 0.6
    expected = _brute_auroc(scores.tolist(), poisoned.tolist())
    assert auroc(scores, poisoned) == pytest.approx(expected, abs=1e-12)


def test_auroc_large_input_is_rank_based():
    # 400,000 samples: 4e10 pairs, out of reach of a pair count. Pairs (2m, 2m+1) share
    # score m, the even one poisoned: each poisoned sample beats m clean ones and ties one, so
    # U = sum_m (m + 1/2) = M^2 / 2 over M = 200,000 poisoned and as many clean: AUROC 1/2.
    n = 400_000
    idx = np.arange(n)
    assert auroc(idx // 2, idx % 2 == 0) == 0.5
    assert auroc(idx, idx % 2 == 0) == pytest.approx(0.5 - 0.5 / (n // 2))  # U = M(M-1)/2


def test_auroc_rejects_bad_input():
    with pytest.raises(ValueError):
        auroc([0.1, float("nan")], [T, F])
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [T, F, F])
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [2, 0])


# ---- decision quality


def test_decision_quality_hand_case():
    suspected = [T, T, T, F, F, F, F, T]
    poisoned = [T, T, F, T, F, F, F, F]
    # tp: 0, 1; fp: 2, 7; fn: 3; tn: 4, 5, 6
    q = decision_quality(suspected, poisoned)
    assert (q["tp"], q["fp"], q["fn"], q["tn"]) == (2, 2, 1, 3)
    assert all(type(q[k]) is int for k in ("tp", "fp", "fn", "tn"))
    assert q["precision"] == pytest.approx(2 / 4)
    assert q["recall"] == pytest.approx(2 / 3)
    assert q["tpr"] == pytest.approx(2 / 3)
    assert q["fpr"] == pytest.approx(2 / 5)
    # 2PR/(P+R) = 2 * 1/2 * 2/3 / (7/6) = 4/7 = 2tp / (2tp + fp + fn)
    assert q["f1"] == pytest.approx(4 / 7)


def test_decision_quality_nan_cases():
    # suspects only clean samples: P = R = 0, F1 undefined
    q = decision_quality([T, T, F, F], [F, F, T, F])
    assert (q["tp"], q["fp"], q["fn"], q["tn"]) == (0, 2, 1, 1)
    assert q["precision"] == 0.0 and q["recall"] == 0.0
    assert q["fpr"] == pytest.approx(2 / 3)
    assert math.isnan(q["f1"])
    # suspects nothing: precision 0/0
    q = decision_quality([F, F, F], [T, F, F])
    assert (q["tp"], q["fp"], q["fn"], q["tn"]) == (0, 0, 1, 2)
    assert math.isnan(q["precision"]) and math.isnan(q["f1"])
    assert q["recall"] == 0.0 and q["fpr"] == 0.0
    # nothing poisoned: recall 0/0
    q = decision_quality([T, F, F], [F, F, F])
    assert q["precision"] == 0.0 and q["fpr"] == pytest.approx(1 / 3)
    assert math.isnan(q["recall"]) and math.isnan(q["tpr"]) and math.isnan(q["f1"])
    # all poisoned, all suspected: fpr 0/0
    q = decision_quality([T, T], [T, T])
    assert (q["precision"], q["recall"], q["f1"]) == (1.0, 1.0, 1.0)
    assert math.isnan(q["fpr"])


# ---- filtering rate


def test_filtering_rate_ties_at_the_cut_in_index_order():
    scores = [1.0, 3.0, 3.0, 3.0, 0.0, 2.0]
    poisoned = [F, F, T, T, T, F]
    # descending, ties by index: 1 (3, clean), 2 (3, p), 3 (3, p), 5 (2), 0 (1), 4 (0, p)
    assert filtering_rate(scores, poisoned, 1) == 0.0
    assert filtering_rate(scores, poisoned, 2) == 0.5
    assert filtering_rate(scores, poisoned, 3) == pytest.approx(2 / 3)
    assert filtering_rate(scores, poisoned, 4) == 0.5
    assert filtering_rate(scores, poisoned, 5) == pytest.approx(2 / 5)
    assert filtering_rate(scores, poisoned, 6) == 0.5
    # the same tie with the poisoned ones first in index order
    assert filtering_rate([3.0, 3.0, 3.0], [T, F, F], 1) == 1.0
    assert filtering_rate([3.0, 3.0, 3.0], [F, F, T], 2) == 0.0


def test_filtering_rate_clips_k_and_rejects_nonpositive_k():
    scores = [0.2, 0.9, 0.5]
    poisoned = [T, F, F]
    assert filtering_rate(scores, poisoned, 3) == pytest.approx(1 / 3)
    assert filtering_rate(scores, poisoned, 1000) == pytest.approx(1 / 3)
    assert filtering_rate(scores, poisoned, np.int64(2)) == 0.0
    for k in (0, -1):
        with pytest.raises(ValueError):
            filtering_rate(scores, poisoned, k)
    with pytest.raises(TypeError):
        filtering_rate(scores, poisoned, 2.5)
    assert math.isnan(filtering_rate([], [], 5))


# ---- the authors' k


def test_authors_constants():
    assert AUTHORS_K == (250, 500, 1000, 1500)
    assert AUTHORS_TRAIN_SIZE == 50_000
    assert AUTHORS_FILTERING == {"badnets": (100.0, 97.60, 90.87, 70.09),
                                 "blend": (97.87, 94.67, 87.27, 75.16),
                                 "wanet": (100.0, 100.0, 99.47, 97.46)}


def test_scaled_k():
    assert scaled_k(20_000) == [(250, 100, 0.005), (500, 200, 0.01), (1000, 400, 0.02),
                                (1500, 600, 0.03)]
    assert scaled_k(50_000) == [(250, 250, 0.005), (500, 500, 0.01), (1000, 1000, 0.02),
                                (1500, 1500, 0.03)]
    # 250 * 500 / 50000 = 2.5 rounds up to 3; 250 * 100 / 50000 = 0.5 -> 1
    assert [k for _, k, _ in scaled_k(500)] == [3, 5, 10, 15]
    assert [k for _, k, _ in scaled_k(100)] == [1, 1, 2, 3]
    assert [k for _, k, _ in scaled_k(1)] == [1, 1, 1, 1]  # at least 1
    assert all(type(k) is int for _, k, _ in scaled_k(12_345))
    for n in (0, -5):
        with pytest.raises(ValueError):
            scaled_k(n)


# ---- the combined report


def _walk(x):
    """Every leaf of a nested dict/list."""
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from _walk(v)
    else:
        yield x


def test_detection_report_with_target_class():
    scores = [0.9, 0.8, 0.1, 0.7, 0.2, 0.6, 0.3, 0.05, 0.4, 0.5]
    poisoned = [T, T, F, F, F, T, F, F, F, F]
    suspected = [T, T, F, T, F, F, F, F, F, F]
    targets = [0, 0, 1, 0, 1, 0, 2, 0, 2, 1]
    r = detection_report(np.array(scores), np.array(poisoned), np.array(suspected),
                         np.array(targets), np.int64(0))
    assert (r["n"], r["n_poisoned"], r["n_suspected"]) == (10, 3, 3)
    # poisoned 0.9, 0.8, 0.6 against 7 clean: 7 + 7 + 6 (0.6 < 0.7) = 20 of 21 pairs
    assert r["auroc"] == pytest.approx(20 / 21)
    d = r["decision"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (2, 1, 1, 6)
    assert d["precision"] == pytest.approx(2 / 3) and d["recall"] == pytest.approx(2 / 3)
    assert d["f1"] == pytest.approx(2 / 3) and d["fpr"] == pytest.approx(1 / 7)
    # n = 10: every scaled k is round(<= 0.3) -> at least 1; the top sample (0.9) is poisoned
    assert r["filtering"] == [
        {"k_authors": 250, "k": 1, "share": 0.005, "rate": 1.0},
        {"k_authors": 500, "k": 1, "share": 0.01, "rate": 1.0},
        {"k_authors": 1000, "k": 1, "share": 0.02, "rate": 1.0},
        {"k_authors": 1500, "k": 1, "share": 0.03, "rate": 1.0}]
    assert r["target_label"] == 0
    c = r["target_class"]  # indices 0, 1, 3, 5, 7: scores 0.9, 0.8, 0.7, 0.6, 0.05
    assert (c["n"], c["n_poisoned"], c["n_suspected"]) == (5, 3, 3)
    # poisoned 0.9, 0.8, 0.6 against clean 0.7, 0.05: 2 + 2 + 1 = 5 of 6 pairs
    assert c["auroc"] == pytest.approx(5 / 6)
    d = c["decision"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (2, 1, 1, 1)
    assert d["fpr"] == 0.5 and d["f1"] == pytest.approx(2 / 3)
    assert [f["k"] for f in c["filtering"]] == [1, 1, 1, 1]
    assert [f["rate"] for f in c["filtering"]] == [1.0, 1.0, 1.0, 1.0]
    # JSON-ready: Python types only
    assert all(type(v) in (int, float, str, bool) for v in _walk(r))
    assert json.loads(json.dumps(r))["target_class"]["n"] == 5


def test_detection_report_uses_each_scaled_k():
    # 200 samples ranked by index; scaled k = 1, 2, 4, 6. Poisoned: 0, 2, 3, 5 and 100.
    n = 200
    scores = -np.arange(n, dtype=float)
    poisoned = np.zeros(n, dtype=bool)
    poisoned[[0, 2, 3, 5, 100]] = True
    r = detection_report(scores, poisoned, poisoned)
    assert [(f["k_authors"], f["k"]) for f in r["filtering"]] == [
        (250, 1), (500, 2), (1000, 4), (1500, 6)]
    # top 1: {0}; top 2: {0}; top 4: {0, 2, 3}; top 6: {0, 2, 3, 5}
    assert [f["rate"] for f in r["filtering"]] == pytest.approx([1.0, 0.5, 0.75, 4 / 6])
    assert "target_class" not in r
    d = r["decision"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (5, 0, 0, 195)
    # pairs lost by each poisoned sample: 0 -> none, 2 and 3 -> clean 1, 5 -> clean 1 and 4,
    # 100 -> the 96 clean samples 1, 4, 6..99: 100 of 5 * 195 pairs
    assert r["auroc"] == pytest.approx(1 - 100 / (5 * 195))


def test_detection_report_without_poisoned_samples_does_not_crash():
    scores = [0.3, 0.2, 0.1, 0.4]
    r = detection_report(scores, [F, F, F, F], [T, F, F, F], targets=[1, 1, 2, 2],
                         target_label=7)
    assert r["n_poisoned"] == 0 and math.isnan(r["auroc"])
    d = r["decision"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (0, 1, 0, 3)
    assert d["precision"] == 0.0 and d["fpr"] == 0.25
    assert math.isnan(d["recall"]) and math.isnan(d["f1"])
    assert [f["rate"] for f in r["filtering"]] == [0.0, 0.0, 0.0, 0.0]
    c = r["target_class"]  # no sample has label 7
    assert (c["n"], c["n_poisoned"], c["n_suspected"]) == (0, 0, 0)
    assert math.isnan(c["auroc"]) and c["filtering"] == []
    assert math.isnan(c["decision"]["precision"]) and math.isnan(c["decision"]["fpr"])
    json.dumps(r)  # NaN is written as NaN


def test_detection_report_rejects_half_a_target_spec():
    with pytest.raises(ValueError):
        detection_report([0.1, 0.2], [T, F], [T, F], targets=[0, 1])
    with pytest.raises(ValueError):
        detection_report([0.1, 0.2], [T, F], [T, F], target_label=0)
    with pytest.raises(ValueError):
        detection_report([0.1, 0.2], [T, F], [T, F, F])


# ---- DER


def test_der_hand_cases():
    assert der(0.9, 1.0, 0.9, 0.0) == 1.0  # ASR 1 -> 0, BA kept: perfect
    assert der(0.9, 0.8, 0.9, 0.8) == 0.5  # nothing changes
    assert der(1.0, 0.5, 0.0, 0.5) == 0.0  # BA 1 -> 0, ASR kept: the floor
    # ASR 0.9 -> 0.1 (+0.8) at a BA loss of 0.1: (0.8 - 0.1 + 1) / 2 = 0.85
    assert der(0.9, 0.9, 0.8, 0.1) == pytest.approx(0.85)
    # BA loss alone lowers it: (0 - 0.2 + 1) / 2 = 0.4
    assert der(0.9, 0.9, 0.7, 0.9) == pytest.approx(0.4)
    # an ASR rise counts as 0, not as a penalty: still 0.5, and 0.45 with a BA loss of 0.1
    assert der(0.9, 0.2, 0.9, 0.9) == 0.5
    assert der(0.9, 0.2, 0.8, 0.9) == pytest.approx(0.45)
    # a BA rise counts as 0, not as a bonus
    assert der(0.8, 0.9, 0.9, 0.1) == pytest.approx(0.9)


def test_der_reproduces_published_values():
    # Zhu et al. (ICCV 2023) table 1, CIFAR-10, in percent. BadNets 91.82/93.79 -> FT
    # 90.29/1.70: (92.09 - 1.53 + 100) / 2 = 95.28.
    assert 100 * der(0.9182, 0.9379, 0.9029, 0.0170) == pytest.approx(95.28, abs=5e-3)
    # CLA 84.55/99.93 -> FT 90.38/10.76 (BA rose): (89.17 + 100) / 2 = 94.585 -> 94.59
    assert 100 * der(0.8455, 0.9993, 0.9038, 0.1076) == pytest.approx(94.585, abs=5e-3)
    # Input-aware 94.03/98.35 -> NC 94.11/98.98 (both rose): 50.00
    assert 100 * der(0.9403, 0.9835, 0.9411, 0.9898) == 50.0


def test_der_rejects_percentages_and_passes_nan():
    with pytest.raises(ValueError):
        der(91.8, 93.8, 90.3, 1.7)
    with pytest.raises(ValueError):
        der(0.9, 0.9, -0.1, 0.1)
    assert math.isnan(der(0.9, float("nan"), 0.9, 0.1))
