"""DBD's split as a poisoned-sample detector: AUROC of the per-sample score (the symmetric
cross-entropy loss under the given label; high = suspicious), the quality of the "unlabelled"
decision, the authors' successful filtering rate at their k, and BackdoorBench's DER."""

from __future__ import annotations

import csv
import math
import operator
from pathlib import Path

import numpy as np

# The authors' k (top-k highest-loss samples) and the training set they were counted on
# (CIFAR-10's 50,000 images).
AUTHORS_K = (250, 500, 1000, 1500)
AUTHORS_TRAIN_SIZE = 50_000

# The authors' successful filtering rates (%) on CIFAR-10 at AUTHORS_K, for reports to cite.
AUTHORS_FILTERING = {
    "badnets": (100.0, 97.60, 90.87, 70.09),
    "blend": (97.87, 94.67, 87.27, 75.16),
    "wanet": (100.0, 100.0, 99.47, 97.46),
}


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a ranking needs every score")
    return s


def _flags(name: str, a, n: int | None = None) -> np.ndarray:
    """``a`` as a bool array: bools, or numbers 0/1 (the repository's index arrays)."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.dtype != bool:
        if a.size and not (np.issubdtype(a.dtype, np.number) and np.isin(a, (0, 1)).all()):
            raise ValueError(f"{name} must be bool or 0/1, got dtype {a.dtype}")
        a = a.astype(bool)
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries, the scores {n}")
    return a


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def auroc(scores, poisoned) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``poisoned``: the probability
    that a poisoned sample scores higher than a clean one, ties counted as half (Mann-Whitney
    U / (n_pos * n_neg), from average ranks; O(N log N)). 1 = perfect, 0.5 = chance, NaN when
    either class is empty."""
    s = _scores(scores)
    pos = _flags("poisoned", poisoned, len(s))
    n_pos = int(pos.sum())
    n_neg = len(s) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ranked = s[order]
    # tie groups of the sorted scores: [start, end) each, 1-based average rank (start+1+end)/2
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def decision_quality(suspected, poisoned) -> dict:
    """"Suspected" (DBD: unlabelled) as a detector of ``poisoned``: the counts ``tp`` (poisoned
    and suspected), ``fp``, ``fn``, ``tn`` (ints); ``precision`` (share of the suspected that
    are poisoned), ``recall`` = ``tpr`` (share of the poisoned that are suspected), ``fpr``
    (share of the clean that are suspected), ``f1`` = 2PR/(P+R). NaN where a denominator is 0."""
    sus = _flags("suspected", suspected)
    pos = _flags("poisoned", poisoned, len(sus))
    tp = int((sus & pos).sum())
    fp = int((sus & ~pos).sum())
    fn = int((~sus & pos).sum())
    tn = int((~sus & ~pos).sum())
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    pr = precision + recall  # NaN when either is
    f1 = 2 * precision * recall / pr if pr > 0 else math.nan
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "f1": f1, "tpr": recall, "fpr": _ratio(fp, fp + tn)}


def filtering_rate(scores, poisoned, k: int) -> float:
    """The authors' successful filtering rate: the share of poisoned samples among the ``k``
    highest-scoring samples (ties at the cut taken in index order). ``k`` above the number of
    samples means all of them; NaN for no samples."""
    k = operator.index(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    s = _scores(scores)
    pos = _flags("poisoned", poisoned, len(s))
    k = min(k, len(s))
    if k == 0:
        return math.nan
    top = np.argsort(-s, kind="stable")[:k]
    return float(pos[top].sum() / k)


def scaled_k(n: int) -> list[tuple[int, int, float]]:
    """For a training set of ``n`` samples, one ``(k_authors, k, share)`` per authors' k:
    ``share`` = k_authors / 50000, the fraction of CIFAR-10's training set the authors kept,
    and ``k`` = round(share * n) (halves rounded up, exact in integers), at least 1."""
    n = operator.index(n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return [(ka, max(1, (2 * ka * n + AUTHORS_TRAIN_SIZE) // (2 * AUTHORS_TRAIN_SIZE)),
             ka / AUTHORS_TRAIN_SIZE) for ka in AUTHORS_K]


def _section(s: np.ndarray, pos: np.ndarray, sus: np.ndarray) -> dict:
    """The detection metrics of one set of samples, k scaled to its size."""
    n = len(s)
    filtering = [{"k_authors": ka, "k": k, "share": share, "rate": filtering_rate(s, pos, k)}
                 for ka, k, share in scaled_k(n)] if n else []
    return {"n": n, "n_poisoned": int(pos.sum()), "n_suspected": int(sus.sum()),
            "auroc": auroc(s, pos), "decision": decision_quality(sus, pos),
            "filtering": filtering}


def detection_report(scores, poisoned, suspected, targets=None, target_label=None) -> dict:
    """Every metric above in one JSON-ready dict (Python ints, floats, lists; NaN where a
    metric is undefined, e.g. AUROC and recall with no poisoned sample): ``n``,
    ``n_poisoned``, ``n_suspected``, ``auroc``, ``decision`` (``decision_quality``),
    ``filtering`` (a list of {"k_authors", "k", "share", "rate"}, k from ``scaled_k(n)``).

    With ``targets`` (the training labels as given, after poisoning) and ``target_label``,
    ``target_class`` holds the same metrics over the samples labelled ``target_label`` only,
    with k scaled to that class's size m: k = round(share * m), at least 1, share being the
    authors' k / 50000 (``scaled_k(m)``); an empty class gives NaN AUROC and no filtering."""
    s = _scores(scores)
    pos = _flags("poisoned", poisoned, len(s))
    sus = _flags("suspected", suspected, len(s))
    report = _section(s, pos, sus)
    if (targets is None) != (target_label is None):
        raise ValueError("give both targets and target_label, or neither")
    if targets is not None:
        t = np.asarray(targets)
        if t.shape != s.shape:
            raise ValueError(f"targets have shape {t.shape}, the scores {s.shape}")
        in_class = t == target_label
        report["target_label"] = int(target_label)
        report["target_class"] = _section(s[in_class], pos[in_class], sus[in_class])
    return report


def der(ba_no_defense: float, asr_no_defense: float, ba_defense: float,
        asr_defense: float) -> float:
    """Defense effectiveness rating, DER = [max(0, dASR) - max(0, dBA) + 1] / 2 with dASR =
    ASR_no_defense - ASR_defense and dBA = BA_no_defense - BA_defense, all fractions in
    [0, 1]; DER is in [0, 1]: 1 = ASR 1 -> 0 with no BA lost, 0.5 = nothing changed (or ASR
    and BA both rose), 0 = BA 1 -> 0 with ASR unchanged. A rise of ASR or of BA counts as 0.

    As defined in Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with
    Sharpness-Aware Minimization" (ICCV 2023, eq. 7; tables in percent, i.e. 100 * DER) and
    in BackdoorBench (SCLBD/BackdoorBench, utils/metric.py: the docstring and
    ``defense_effectiveness_rate_simplied``, used by analysis/visual_metric.py, on fractions).
    Note: that file's ``defense_effectiveness_rate`` (from predictions) adds the BA term
    instead of subtracting it; the paper's tables match the subtraction, followed here.
    NaN in any input gives NaN."""
    values = (ba_no_defense, asr_no_defense, ba_defense, asr_defense)
    if any(math.isnan(v) for v in values):
        return math.nan
    for name, v in zip(("ba_no_defense", "asr_no_defense", "ba_defense", "asr_defense"),
                       values):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {v} (a percentage?)")
    d_asr = asr_no_defense - asr_defense
    d_ba = ba_no_defense - ba_defense
    return float((max(0.0, d_asr) - max(0.0, d_ba) + 1.0) / 2.0)


# ---- The fine-tuning's split files (split_losses_first.npz / _last.npz) -------------------

SPLIT_FILES = {"first": "split_losses_first.npz", "last": "split_losses_last.npz"}
SUSPECTS_FILE = "suspected_poison.csv"
SUSPECTS_COLUMNS = ("index", "label", "score_first", "score_last", "labelled_last", "poisoned")


def read_split(finetune_dir: Path, tag: str, target_label: int | None = None) -> dict | None:
    """The ``tag`` ("first" or "last") split of a fine-tuning run: epoch, per-sample losses,
    the labelled mask, ground-truth poison flags (None where unknown), the labels as given and
    the true classes. Files written before the given labels were saved rebuild them from the
    poison flags and ``target_label`` (the poison-label attacks relabel to it)."""
    path = Path(finetune_dir) / SPLIT_FILES[tag]
    if not path.is_file():
        return None
    d = np.load(path)
    poison = d["poison"].astype(bool) if "poison" in d else None
    if poison is not None and "known" in d and not bool(d["known"]):
        poison = None
    origin = d["origin"] if "origin" in d else None
    if "targets" in d:
        targets = d["targets"]
    elif origin is not None and poison is not None and target_label is not None:
        targets = np.where(poison, target_label, origin)
    else:
        targets = None
    return {"epoch": int(d["epoch"]), "losses": d["losses"].astype(np.float64),
            "labelled": d["semi_idx"] == 1, "poison": poison, "targets": targets,
            "origin": origin}


def split_detection(finetune_dir: Path, target_label: int | None) -> dict:
    """``detection_report`` of the first and the last split of a fine-tuning run (score: the
    sample's loss; decision: unlabelled), by tag; {} where no split was saved or the poisoned
    samples are unknown."""
    out = {}
    for tag in SPLIT_FILES:
        split = read_split(finetune_dir, tag, target_label)
        if split is None or split["poison"] is None:
            continue
        with_class = split["targets"] is not None and target_label is not None
        out[tag] = {"epoch": split["epoch"], **detection_report(
            split["losses"], split["poison"], ~split["labelled"],
            split["targets"] if with_class else None, target_label if with_class else None)}
    return out


def write_suspects(finetune_dir: Path, dest: Path, target_label: int | None = None) -> Path | None:
    """``suspected_poison.csv``: one row per training sample, its index, its label as given,
    its score (loss) at the first split (the warm-up model's) and at the last one, whether the
    last split kept it labelled, and whether it is poisoned (empty where unknown). None when
    the run saved no split."""
    first = read_split(finetune_dir, "first", target_label)
    last = read_split(finetune_dir, "last", target_label)
    if first is None or last is None:
        return None
    labels = last["targets"]
    rows = zip(range(len(last["losses"])), labels if labels is not None else [""] * len(last["losses"]),
               first["losses"], last["losses"], last["labelled"].astype(int),
               last["poison"].astype(int) if last["poison"] is not None
               else [""] * len(last["losses"]))
    tmp = Path(dest).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(SUSPECTS_COLUMNS)
        for i, label, s1, s2, lab, pois in rows:
            w.writerow([i, label, f"{s1:.6g}", f"{s2:.6g}", lab, pois])
    tmp.replace(dest)
    return Path(dest)
