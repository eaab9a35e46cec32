"""The experiment report: report.md, report.json, leaderboard.csv and matplotlib pictures; the
combined report of a sweep: sweep.md, sweep.json, sweep.csv and sweep.png."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np

from tools.detection import AUTHORS_FILTERING, SUSPECTS_FILE, der, split_detection, write_suspects
from utils.machine import machine
from utils.metrics import read_csv


def _plot_curves(path: Path, attack: str, stages: dict, warmup_epochs: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in ((axes[0], "supervise", "No Defense"),
                           (axes[2], "finetune", "DBD: warm-up + MixMatch")):
        log = Path(stages[key]) / "log"
        clean, poison = read_csv(log / "clean_test.csv"), read_csv(log / "poison_test.csv")
        if clean:
            ax.plot([r["epoch"] for r in clean], [100 * r["BA"] for r in clean], "o-", ms=3,
                    label="BA")
            ax.plot([r["epoch"] for r in poison], [100 * r["ASR"] for r in poison], "s-", ms=3,
                    label="ASR")
        if key == "finetune" and warmup_epochs:
            ax.axvspan(0.5, warmup_epochs + 0.5, color="0.9", label="warm-up")
        ax.set(title=f"{title} ({attack})", xlabel="epoch", ylabel="%", ylim=(-2, 102))
        ax.legend(loc="best", fontsize=8)
    self_rows = read_csv(Path(stages["simclr"]) / "log" / "self_train.csv")
    axes[1].plot([r["epoch"] for r in self_rows], [r["loss"] for r in self_rows], "o-", ms=3)
    axes[1].set(title="DBD: SimCLR (no labels)", xlabel="epoch", ylabel="NT-Xent loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_split(path: Path, attack: str, npz: Path) -> dict | None:
    if not npz.is_file():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.load(npz)
    losses, poison, eps = d["losses"], d["poison"] == 1, float(d["epsilon"])
    cut = float(np.sort(losses)[max(int(len(losses) * eps) - 1, 0)])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bins = np.linspace(losses.min(), losses.max(), 60)
    ax.hist(losses[~poison], bins=bins, alpha=0.6, label=f"clean ({int((~poison).sum())})")
    ax.hist(losses[poison], bins=bins, alpha=0.8, color="tab:red",
            label=f"poisoned ({int(poison.sum())})")
    ax.axvline(cut, color="k", ls="--", label=f"ε = {eps} cut: lower half labelled")
    ax.set(yscale="log", xlabel="per-sample SCE loss after the warm-up", ylabel="samples",
           title=f"The split at epoch {int(d['epoch'])} ({attack})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"epoch": int(d["epoch"]), "cut": cut,
            "poisoned_below_cut": int((poison & (losses <= cut)).sum()),
            "poisoned": int(poison.sum())}


def labelled_by_class(finetune_dir: Path) -> dict:
    """How many samples of each true class the first and the last split kept labelled: with
    weak features the global low-loss half can starve the hard classes."""
    out = {}
    for tag in ("first", "last"):
        npz = Path(finetune_dir) / f"split_losses_{tag}.npz"
        if not npz.is_file():
            continue
        d = np.load(npz)
        if "origin" not in d:  # written before the true classes were saved with the split
            continue
        origin, labelled = d["origin"], d["semi_idx"] == 1
        n = int(origin.max()) + 1
        out[tag] = {"epoch": int(d["epoch"]),
                    "labelled": np.bincount(origin[labelled], minlength=n).tolist(),
                    "total": np.bincount(origin, minlength=n).tolist()}
    return out


def _plot_features(path: Path, attack: str, feats: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (title, (xy, labels, poison)) in zip(axes, feats["maps"].items()):
        sc = ax.scatter(xy[~poison, 0], xy[~poison, 1], c=labels[~poison], cmap="tab10", s=5,
                        vmin=0, vmax=9, alpha=0.7)
        ax.scatter(xy[poison, 0], xy[poison, 1], marker="x", c="k", s=14, linewidths=0.8,
                   label="poisoned")
        ax.set(title=title, xticks=[], yticks=[])
        ax.legend(loc="best", fontsize=8)
    fig.colorbar(sc, ax=axes, label="true class", ticks=range(10))
    fig.suptitle(f"PCA of penultimate features, training images ({attack})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, profile: str, results: dict) -> dict:
    """``results[attack]``: an experiment's result (``pipeline.experiment.ExperimentResult``:
    both models' metrics, the stages' run folders, timings, setting, feature maps)."""
    out = Path(out)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "profile": profile,
              "attacks": {}}
    lines = [f"# DBD experiment report ({profile} profile)", "",
             f"{report['date']}, {report['machine']}.", "",
             "## BA / ASR / RA (%)", "",
             "| Method | Attack | BA | ASR | RA | floor | lift | DER |",
             "|---|---|---|---|---|---|---|---|"]
    for attack, r in results.items():
        for method, key in (("No Defense", "no_defense"), ("DBD", "dbd")):
            m = getattr(r, key)
            rating = "" if key == "no_defense" else f"{100 * _der(r):.2f}"
            lines.append(f"| {method} | {attack} | {100 * m['BA']:.2f} | {100 * m['ASR']:.2f} | "
                         f"{100 * m['RA']:.2f} | {_pct(m.get('floor'))} | "
                         f"{_pct(m.get('lift'))} | {rating} |")
    lines += ["", "floor: the share of the same non-target test images that the model sends to "
              "the target without the trigger; lift: ASR - floor, what the trigger adds. DER: "
              "BackdoorBench's defense effectiveness rating, [max(0, ASR drop) - max(0, BA "
              "drop) + 1] / 2 against No Defense, in %: 100 = the backdoor gone at no cost in "
              "BA, 50 = nothing changed."]
    for attack, r in results.items():
        stages = r.stages
        entry = {"no_defense": r.no_defense, "dbd": r.dbd, "der": _der(r),
                 "wall_time_s": r.timings, "stage_seconds": r.stage_seconds}
        split_rows = read_csv(Path(stages["finetune"]) / "log" / "split.csv")
        entry["split"] = split_rows
        rule = (r.setting or {}).get("split")
        lines += ["", f"## {attack}", "", "### The split (per MixMatch epoch)", ""]
        if rule:
            lines += [f"Split: {rule}.", ""]
        lines += ["| epoch | poisoned kept labelled | poisoned in all | labelled | "
                  "precision | recall |", "|---|---|---|---|---|---|"]
        for row in split_rows:
            lines.append(f"| {row['epoch']} | {row['poisoned_labelled']} | "
                         f"{row['poisoned_total']} | {row['labelled']} | "
                         f"{row['precision']:.3f} | {row['recall']:.3f} |")
        lines += ["", "precision and recall of \"unlabelled\" as a poison detector.", ""]
        by_class = labelled_by_class(stages["finetune"])
        if by_class:
            entry["labelled_by_class"] = by_class
            n = len(next(iter(by_class.values()))["total"])
            names = (r.setting or {}).get("classes") or [f"class {c}" for c in range(n)]
            lines += ["### The labelled half by true class", "",
                      "| split | " + " | ".join(names[:n]) + " |",
                      "|---|" + "---|" * n]
            for tag, row in by_class.items():
                cells = " | ".join(f"{k} / {t}" for k, t in zip(row["labelled"], row["total"]))
                lines.append(f"| {tag} (epoch {row['epoch']}) | {cells} |")
            lines += ["", "Samples kept labelled / samples of that true class in the training "
                      "set (poisoned ones counted under their true class).", ""]
        target = (r.setting or {}).get("target_label")
        detection = split_detection(stages["finetune"], target)
        if detection:
            entry["detection"] = detection
            lines += _detection_lines(attack, detection)
        name = SUSPECTS_FILE if len(results) == 1 else f"{attack}_{SUSPECTS_FILE}"
        if write_suspects(stages["finetune"], out / name, target):
            entry["suspects_file"] = name
            lines += [f"Every training sample's score and decision: [{name}]({name}).", ""]
        lines += ["### Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        for stage, secs in r.timings.items():
            lines.append(f"| {stage} | {secs:.0f} |")
        _plot_curves(out / f"{attack}_curves.png", attack, stages, r.warmup_epochs)
        lines += ["", "### Pictures", "", f"![BA and ASR per epoch]({attack}_curves.png)", ""]
        hist = _plot_split(out / f"{attack}_split_hist.png", attack,
                           Path(stages["finetune"]) / "split_losses_first.npz")
        if hist:
            entry["first_split"] = hist
            lines += [f"![SCE losses at the split]({attack}_split_hist.png)", "",
                      f"At the first split (epoch {hist['epoch']}), "
                      f"{hist['poisoned_below_cut']} of {hist['poisoned']} poisoned samples "
                      "fall below the cut and keep their label.", ""]
        if r.features:
            _plot_features(out / f"{attack}_features.png", attack, r.features)
            share = r.features["poisoned_neighbours"]
            nd_share, simclr_share = (100 * v for v in share.values())
            entry["poisoned_neighbours"] = share
            lines += [f"![Features]({attack}_features.png)", "",
                      "Of the 10 nearest neighbours of a poisoned sample in the full feature "
                      f"space, {nd_share:.0f} % are poisoned in the No-Defense model's features "
                      f"and {simclr_share:.0f} % in SimCLR's; "
                      f"{100 * r.features['poisoned_share']:.0f} % of the plotted samples "
                      "are poisoned.", ""]
        if r.setting:
            entry["setting"] = r.setting
        report["attacks"][attack] = entry
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_csv(out / "leaderboard.csv", LEADERBOARD_COLUMNS, leaderboard_rows(report))
    return report


def _der(r) -> float:
    nd, d = r.no_defense, r.dbd
    return der(nd["BA"], nd["ASR"], d["BA"], d["ASR"])


def _pct(x) -> str:
    return "" if x is None or x != x else f"{100 * x:.2f}"


def _detection_lines(attack: str, detection: dict) -> list[str]:
    """The split as a poisoned-sample detector: AUROC of the loss, the unlabelled half's
    precision / recall / F1, and the authors' successful filtering rate at their k."""
    lines = ["### The split as a poisoned-sample detector", "",
             "| split | AUROC of the loss | precision | recall | F1 | FPR | AUROC within the "
             "target class |", "|---|---|---|---|---|---|---|"]
    for tag, d in detection.items():
        q = d["decision"]
        within = d.get("target_class", {}).get("auroc")
        lines.append(f"| {tag} (epoch {d['epoch']}) | {_pct(d['auroc'])} | "
                     f"{_pct(q['precision'])} | {_pct(q['recall'])} | {_pct(q['f1'])} | "
                     f"{_pct(q['fpr'])} | {_pct(within)} |")
    authors = AUTHORS_FILTERING.get(attack)
    first = next(iter(detection.values()))
    lines += ["", "Successful filtering rate: the poisoned share (%) of the k highest-loss "
              "samples, k scaled from the authors' k on CIFAR-10's 50,000 images to this "
              f"training set ({first['n']} samples, {first['n_poisoned']} poisoned; within the "
              "target class, k scaled to the class's size).", "",
              "| authors' k | share | k | " + " | ".join(
                  f"{tag} split | {tag}, target class" for tag in detection)
              + (" | authors (CIFAR-10) |" if authors else " |"),
              "|---|---|---|" + "---|---|" * len(detection) + ("---|" if authors else "")]
    for i, row in enumerate(first["filtering"]):
        cells = []
        for d in detection.values():
            within = d.get("target_class", {}).get("filtering") or []
            cells += [_pct(d["filtering"][i]["rate"]),
                      _pct(within[i]["rate"]) if i < len(within) else ""]
        lines.append(f"| {row['k_authors']} | {100 * row['share']:.1f} % | {row['k']} | "
                     + " | ".join(cells) + (f" | {authors[i]:.2f} |" if authors else " |"))
    return lines + [""]


# ---- leaderboard.csv: BackdoorBench's leaderboard columns, one row per model ---------------

LEADERBOARD_COLUMNS = ("dataset", "model", "attack", "defense", "poison_ratio", "clean_acc",
                       "asr", "ra", "der", "asr_floor", "asr_lift", "profile", "train_size",
                       "test_size",
                       "supervise_s", "simclr_s", "finetune_s")
# the model of each row, and the training stages that made it
DEFENSES = (("none", "no_defense", ("supervise",)), ("dbd", "dbd", ("simclr", "finetune")))


def _percent(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def leaderboard_rows(report: dict) -> list[dict]:
    """One row per attack and model (No Defense: ``none``, DBD: ``dbd``), BA / ASR / RA and
    DER (the defended model's) in percent with two decimals, as in report.md, and the wall
    time of the training stages that made the model, in seconds."""
    rows = []
    for attack, entry in report["attacks"].items():
        setting = entry.get("setting") or {}
        seconds = entry.get("stage_seconds") or {}
        for defense, key, stages in DEFENSES:
            m = entry[key]
            rows.append({"dataset": setting.get("dataset"), "model": setting.get("model"),
                         "attack": attack, "defense": defense,
                         "poison_ratio": setting.get("poison_ratio"),
                         "clean_acc": _percent(m["BA"]), "asr": _percent(m["ASR"]),
                         "ra": _percent(m["RA"]),
                         "der": _percent(entry.get("der")) if key == "dbd" else None,
                         "asr_floor": _percent(m.get("floor")),
                         "asr_lift": _percent(m.get("lift")),
                         "profile": report["profile"],
                         "train_size": setting.get("train_size"),
                         "test_size": setting.get("test_size"),
                         **{f"{s}_s": (f"{seconds[s]:.0f}" if s in seconds else None)
                            for s in stages}})
    return rows


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


# ---- The combined report of a sweep (dbd.py --sweep) ----------------------------------------


def _epoch_row(rows: list[dict], epoch: int) -> dict | None:
    return next((r for r in rows if r.get("epoch") == epoch), None)


def sweep_entry(value: str, folder: str, result: dict, report_entry: dict) -> dict:
    """One value's figures: both models' BA/ASR/RA, the poisoned samples kept labelled at the
    first and the last split, the labelled count per true class there, the warm-up model's
    BA/ASR and DBD's BA/ASR after every fine-tuning epoch (from the fine-tuning CSVs)."""
    stages = result.stages
    split = report_entry.get("split") or []
    first, last = (split[0], split[-1]) if split else (None, None)
    warmup = None
    w = result.warmup_epochs
    log = Path(stages["finetune"]) / "log"
    clean_rows, poison_rows = read_csv(log / "clean_test.csv"), read_csv(log / "poison_test.csv")
    if w:
        clean, poison = _epoch_row(clean_rows, w), _epoch_row(poison_rows, w)
        if clean and poison:
            warmup = {"epoch": w, "BA": clean["BA"], "ASR": poison["ASR"]}
    asr = {r.get("epoch"): r.get("ASR") for r in poison_rows}
    epochs = [{"epoch": r["epoch"], "BA": r.get("BA"), "ASR": asr.get(r["epoch"])}
              for r in clean_rows if r.get("epoch") is not None]
    keep = ("BA", "ASR", "RA", "floor", "lift")
    return {"value": value, "folder": folder,
            "no_defense": {k: report_entry["no_defense"].get(k) for k in keep},
            "dbd": {k: report_entry["dbd"].get(k) for k in keep},
            "split_first": first and {k: first[k] for k in
                                      ("epoch", "poisoned_labelled", "poisoned_total")},
            "split_last": last and {k: last[k] for k in
                                    ("epoch", "poisoned_labelled", "poisoned_total")},
            "warmup": warmup,
            "epochs": epochs,
            "classes": (report_entry.get("setting") or {}).get("classes"),
            "labelled_by_class": report_entry.get("labelled_by_class"),
            "stage_runs": {k: str(Path(stages[k])) for k in ("supervise", "simclr",
                                                                "finetune")}}


def write_sweep_report(out: Path, profile: str, attack: str, key: str,
                       experiments: list[dict]) -> dict:
    """``experiments``: per value, in the sweep's order, ``value``, ``folder`` (the value's
    experiment folder), ``result`` (dbd.run_experiment's) and ``report`` (its report.json
    entry)."""
    out = Path(out)
    entries = [sweep_entry(e["value"], e["folder"], e["result"], e["report"])
               for e in experiments]
    sweep = {"date": time.strftime("%Y-%m-%d"), "profile": profile, "attack": attack,
             "key": key, "values": entries}
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    rows = []
    for e in experiments:
        report = {"profile": profile, "attacks": {attack: e["report"]}}
        rows += [{"key": key, "value": e["value"], **row} for row in leaderboard_rows(report)]
    write_csv(out / "sweep.csv", ("key", "value") + LEADERBOARD_COLUMNS, rows)

    def kept(s):
        return "" if not s else f"{s['poisoned_labelled']} / {s['poisoned_total']}"

    def pct(m, k):
        return "" if not m or m.get(k) is None else f"{100 * m[k]:.2f}"

    lines = [f"# DBD sweep over `{key}` ({attack}, {profile} profile)", "",
             f"{sweep['date']}. One experiment per value; each value's folder holds its "
             "report. BA / ASR / RA in %; lift: ASR minus its floor (the same images "
             "untriggered sent to the target); poisoned kept labelled: poisoned samples in "
             "the labelled half / poisoned samples, at the first and the last split.", "",
             f"| {key} | No Defense BA | ASR | RA | lift | DBD BA | ASR | RA | lift | "
             "poisoned kept labelled, first split | last split | warm-up BA | warm-up ASR |",
             "|---|" + "---|" * 12]
    for e in entries:
        nd, d = e["no_defense"], e["dbd"]
        lines.append(f"| [{e['value']}]({e['folder']}/report.md) | {pct(nd, 'BA')} | "
                     f"{pct(nd, 'ASR')} | {pct(nd, 'RA')} | {pct(nd, 'lift')} | "
                     f"{pct(d, 'BA')} | {pct(d, 'ASR')} | {pct(d, 'RA')} | {pct(d, 'lift')} | "
                     f"{kept(e['split_first'])} | {kept(e['split_last'])} | "
                     f"{pct(e['warmup'], 'BA')} | {pct(e['warmup'], 'ASR')} |")
    lines += ["", "![BA, ASR, RA and poisoned kept labelled against the value](sweep.png)", ""]
    lines += _sweep_epoch_table(key, entries) + _sweep_class_table(key, entries)
    lines += ["Stage runs (shared by the values that leave them unchanged):", ""]
    for e in entries:
        runs = ", ".join(f"{k} `{Path(v).relative_to(out).parts[1] if _under(v, out) else v}`"
                         for k, v in e["stage_runs"].items())
        lines.append(f"* {e['value']}: {runs}")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot_sweep(out / "sweep.png", attack, key, entries)
    return sweep


def _sweep_epoch_table(key: str, entries: list[dict]) -> list[str]:
    """DBD's BA and ASR after every fine-tuning epoch (warm-up epochs first), per value."""
    if not any(e.get("epochs") for e in entries):
        return []

    def series(e, metric):
        return " ".join("–" if r[metric] is None else f"{100 * r[metric]:.2f}"
                        for r in e["epochs"])

    lines = ["DBD after each fine-tuning epoch (warm-up epochs first), in %:", "",
             f"| {key} | BA per epoch | ASR per epoch |", "|---|---|---|"]
    lines += [f"| {e['value']} | {series(e, 'BA')} | {series(e, 'ASR')} |" for e in entries
              if e.get("epochs")]
    return lines + [""]


def _sweep_class_table(key: str, entries: list[dict]) -> list[str]:
    """Samples kept labelled per true class at the first and the last split, per value."""
    known = [e for e in entries if e.get("labelled_by_class")]
    if not known:
        return []
    n = len(next(iter(known[0]["labelled_by_class"].values()))["labelled"])
    names = known[0].get("classes") or [f"class {c}" for c in range(n)]
    lines = ["Samples kept labelled per true class (of the class's training samples, poisoned "
             "ones under their true class):", "",
             f"| {key} | split | " + " | ".join(names) + " |", "|---|---|" + "---|" * n]
    for e in known:
        for tag in ("first", "last"):
            t = e["labelled_by_class"].get(tag)
            if t:
                cells = " | ".join(f"{k} / {m}" for k, m in zip(t["labelled"], t["total"]))
                lines.append(f"| {e['value']} | {tag} (epoch {t['epoch']}) | {cells} |")
    return lines + [""]


def _under(path, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def _plot_sweep(path: Path, attack: str, key: str, entries: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [e["value"] for e in entries]
    try:
        x = [float(v) for v in values]
    except ValueError:  # e.g. checkpoint names: in the sweep's order
        x = list(range(len(values)))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, metric in zip(axes, ("BA", "ASR", "RA")):
        for method, name in (("no_defense", "No Defense"), ("dbd", "DBD")):
            ax.plot(x, [100 * e[method][metric] for e in entries], "o-", ms=4, label=name)
        if metric != "RA" and all(e["warmup"] for e in entries):
            ax.plot(x, [100 * e["warmup"][metric] for e in entries], "^--", ms=4,
                    label="DBD warm-up")
        ax.set(title=f"{metric} ({attack})", xlabel=key, ylabel="%", ylim=(-2, 102))
        ax.legend(loc="best", fontsize=8)
    ax = axes[3]
    for tag, name in (("split_first", "first split"), ("split_last", "last split")):
        if all(e[tag] for e in entries):
            ax.plot(x, [e[tag]["poisoned_labelled"] for e in entries], "o-", ms=4, label=name)
    ax.set(title="poisoned samples kept labelled", xlabel=key, ylabel="samples")
    ax.legend(loc="best", fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(values, rotation=30 if max(map(len, values)) > 4 else 0, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
