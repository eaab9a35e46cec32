"""Convert a BackdoorBench attack result (``attack_result.pt``) into a poisoned set (.npz).

    python -m data.import_backdoorbench ATTACK_RESULT OUT [--dataset-dir DIR] [--overwrite]
                                        [--trust-pickle]

BackdoorBench (github.com/SCLBD/BackdoorBench) saves an attack with ``torch.save`` as a dict
with ``model_name``, ``num_classes``, ``model`` (a state dict, not used here), ``data_path``,
``img_size``, ``clean_data`` (the dataset's name), ``bd_train`` and ``bd_test``. Only the
poisoned samples are kept: the rest is rebuilt from the clean dataset, in its order. Two
formats are read, CIFAR-10 only:

* v2 (releases 2.0 to 2.2, ``utils/bd_dataset_v2.py``): ``bd_train``/``bd_test`` are the
  state of a ``prepro_cls_DatasetBD_v2``: ``poison_indicator`` (0/1 per sample of the clean
  set), ``original_index_array`` (the clean indices the set consists of; for ``bd_test`` the
  non-target test images), and ``bd_data_container.data_dict``, which maps each poisoned
  clean index to ``(image, poisoned label, true label)``, or, when the attack wrote its
  images to disk (what its attacks do since 2.0; 2.0 stores absolute paths, 2.2 relative
  ones), to ``{"path": ".../<true label>/<index>.png", "other_info": [poisoned label, true
  label]}``. Those PNG files must be there: in the
  ``bd_train_dataset/`` and ``bd_test_dataset/`` folders beside ``attack_result.pt`` (as
  BackdoorBench writes them), or at the path the file names.
* v1 (release 1.x, ``utils/bd_dataset.py``): ``bd_train`` = ``{"x": poisoned images, "y":
  their labels, "original_index": their clean indices}``, ``bd_test`` = ``{"x", "y",
  "original_index", "original_targets"}``.

The training set is the clean one with the poisoned samples replaced (their images and
labels), ``poisoned`` is BackdoorBench's poison indicator (for WaNet it includes the "noise
mode" samples, which keep their labels) and ``y_train_true`` the clean labels. The triggered
test set is ``bd_test`` with its true labels; its poisoned labels must all be one class, the
target: all-to-all attacks are not supported. The clean CIFAR-10 (``--dataset-dir``: the
``cifar-10-batches-py`` folder or the folder holding it; by default the file's ``data_path``)
must be the copy the attack used: the true labels saved for the poisoned samples are checked
against it.

Loading: ``attack_result.pt`` is a pickle. By default it is read with ``torch.load(...,
weights_only=True)`` allowing only tensors, numpy arrays and scalars, and PIL images, which is
all these formats hold. A file holding other pickled objects is refused;
``--trust-pickle`` loads it with full pickle (``weights_only=False``), which can run any code
the file contains: use it only for a file from a trusted source.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np

from utils.errors import DatasetError, UserError, one_line

from .cifar import CLASSES, find_batches_dir, load_cifar10
from .imagefolder import read_image
from .poisoned_set import PoisonedSet, save_npz

RESULT_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
               "bd_train", "bd_test")


# ------------------------------------------------------------------------------------------
# reading the file


def _safe_globals() -> list:
    """What a BackdoorBench result pickles besides tensors: numpy arrays, dtypes, scalars
    (under numpy 1's and numpy 2's module names) and PIL images."""
    from PIL import Image

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64,
                                          np.uint8, np.uint16, np.uint32, np.uint64,
                                          np.float16, np.float32, np.float64)]
    renamed = [(f, f"{mod}.{f.__name__}") for f in (multiarray._reconstruct, multiarray.scalar)
               for mod in ("numpy.core.multiarray", "numpy._core.multiarray")]
    # an empty array's data pickle as bytes()
    return [np.ndarray, np.dtype, *dtypes, *renamed, Image.Image, bytes,
            (bytes, "__builtin__.bytes")]


def read_attack_result(path: str | Path, trust_pickle: bool = False) -> dict:
    """The dict in ``attack_result.pt`` (see the module docstring on ``trust_pickle``)."""
    import torch

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise DatasetError(f"attack result not found: {path} (BackdoorBench writes it to "
                           "record/<attack folder>/attack_result.pt)")
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "WeightsUnpickler error:" in msg:  # torch's long advice around the reason
            msg = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        if "Unsupported global" in msg or "Can only build" in msg:
            found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", msg)
            what = next((g for g in found.groups() if g), "?") if found else "?"
            raise DatasetError(
                f"{path} holds a pickled object ({what}) beyond tensors, numpy arrays and "
                "PIL images; if the file comes from a trusted source, rerun with "
                "--trust-pickle to load it with full pickle") from None
        raise DatasetError(f"cannot read {path} (UnpicklingError: {one_line(msg)})") from None
    except Exception as e:  # a truncated zip, not a torch file, a missing module, ...
        raise DatasetError(f"cannot read {path} ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} is not a BackdoorBench attack result: it holds a "
                           f"{type(obj).__name__}, not a dict")
    missing = [k for k in RESULT_KEYS if k not in obj]
    if missing:
        found = ", ".join(sorted(map(str, obj))[:8]) or "none"
        raise DatasetError(f"{path} is not a BackdoorBench attack result: key '{missing[0]}' "
                           f"is missing (keys found: {found})")
    return obj


def format_of(result: dict, where: str) -> str:
    """'v2' (a ``prepro_cls_DatasetBD_v2`` state) or 'v1' (x/y arrays)."""
    bd_test = result["bd_test"]
    if isinstance(bd_test, dict) and "bd_data_container" in bd_test:
        return "v2"
    if isinstance(bd_test, dict) and "x" in bd_test:
        return "v1"
    found = (f"a dict with keys {', '.join(sorted(map(str, bd_test))[:8])}"
             if isinstance(bd_test, dict) else f"a {type(bd_test).__name__}")
    raise DatasetError(f"{where}: unsupported format: bd_test is {found}; supported are "
                       "BackdoorBench v2 (bd_data_container) and v1 (x, y, original_index, "
                       "original_targets)")


# ------------------------------------------------------------------------------------------
# images


def _as_image(obj, where: str, what: str) -> np.ndarray:
    """uint8 HWC RGB of a PIL image or a uint8 HWC array."""
    from PIL import Image

    if isinstance(obj, Image.Image):
        img = np.asarray(obj.convert("RGB"), dtype=np.uint8)
    elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 3 \
            and obj.shape[2] == 3:
        img = obj
    else:
        desc = (f"array of dtype {obj.dtype} and shape {list(obj.shape)}"
                if isinstance(obj, np.ndarray) else type(obj).__name__)
        raise DatasetError(f"{where}: {what} is a {desc}; expected a PIL image or a uint8 "
                           "[H, W, 3] array")
    if img.shape != (32, 32, 3):
        raise DatasetError(f"{where}: {what} is {img.shape[0]}x{img.shape[1]}, not the "
                           "32x32 of CIFAR-10")
    return img


def _find_image_file(stored: str, result_dir: Path, where: str, what: str) -> str:
    """The PNG a v2 container names: ``<save folder>/<true label>/<index>.png``, looked for in
    that save folder beside the attack result, then at the stored path itself."""
    parts = Path(str(stored).replace("\\", "/")).parts
    beside = result_dir.joinpath(*parts[-3:])
    for cand in (beside, Path(stored)):
        if cand.is_file():
            return str(cand)
    raise DatasetError(f"{where}: the image of {what} is missing: neither {beside} nor "
                       f"{stored} exists (BackdoorBench keeps poisoned images in "
                       f"{parts[-3] if len(parts) >= 3 else 'bd_*_dataset'}/ beside "
                       "attack_result.pt: copy that folder with it)")


# ------------------------------------------------------------------------------------------
# v2


def _v2_part(state: dict, n_clean: int, result_dir: Path, where: str, part: str):
    """(indices, poisoned flags, {clean index: (loader, poisoned label, true label)})."""
    if not isinstance(state, dict) or "bd_data_container" not in state:
        raise DatasetError(f"{where}: {part} holds no BackdoorBench v2 dataset state")
    indicator = np.asarray(state["poison_indicator"])
    if indicator.ndim != 1 or not np.isin(indicator, (0, 1)).all():
        raise DatasetError(f"{where}: {part}.poison_indicator is not a 0/1 vector")
    if len(indicator) != n_clean:
        raise DatasetError(f"{where}: the clean dataset does not match: {part} covers "
                           f"{len(indicator)} samples, the CIFAR-10 {part.removeprefix('bd_')} "
                           f"set has {n_clean}")
    index = np.asarray(state["original_index_array"], dtype=np.int64).reshape(-1)
    if len(index) and (index.min() < 0 or index.max() >= n_clean):
        raise DatasetError(f"{where}: the clean dataset does not match: {part} refers to "
                           f"sample {int(index.max())}, the CIFAR-10 "
                           f"{part.removeprefix('bd_')} set has {n_clean}")
    container = state["bd_data_container"]
    data = container["data_dict"] if isinstance(container, dict) else None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: {part}.bd_data_container has no data_dict")
    samples = {}
    for key, value in data.items():
        if isinstance(value, dict):  # saved on disk
            bd_label, label = value["other_info"][:2]
            file = value["path"]
            samples[int(key)] = (("file", file), int(bd_label), int(label))
        else:  # in memory: (image, poisoned label, true label)
            img, bd_label, label = value[:3]
            samples[int(key)] = (("object", img), int(bd_label), int(label))
    flags = indicator[index] == 1
    lacking = [int(i) for i in index[flags] if int(i) not in samples]
    if lacking:
        raise DatasetError(f"{where}: {part}.poison_indicator marks sample {lacking[0]} as "
                           "poisoned but the container holds no image for it")
    return index, flags, samples


def _v2_image(sample, result_dir: Path, where: str, what: str) -> np.ndarray:
    kind, obj = sample[0]
    if kind == "file":
        return _as_image(read_image(_find_image_file(obj, result_dir, where, what)), where,
                         what)
    return _as_image(obj, where, what)


def _convert_v2(result: dict, result_dir: Path, clean_train, clean_test, where: str):
    (x_clean, y_clean), (xt_clean, yt_clean) = clean_train, clean_test
    if result["bd_train"] is None:
        raise DatasetError(f"{where}: bd_train is None: this attack result holds no poisoned "
                           "training set")
    index, flags, samples = _v2_part(result["bd_train"], len(x_clean), result_dir, where,
                                     "bd_train")
    x = x_clean[index].copy()
    y = y_clean[index].copy()
    y_true = y_clean[index].copy()
    for j in np.flatnonzero(flags):
        i = int(index[j])
        s = samples[i]
        if s[2] != y_clean[i]:
            raise DatasetError(f"{where}: the clean dataset does not match: training sample "
                               f"{i} has true label {s[2]} in the attack result but "
                               f"{int(y_clean[i])} in the CIFAR-10 copy")
        x[j] = _v2_image(s, result_dir, where, f"poisoned training sample {i}")
        y[j] = s[1]

    t_index, t_flags, t_samples = _v2_part(result["bd_test"], len(xt_clean), result_dir,
                                           where, "bd_test")
    keep = [int(i) for i in t_index[t_flags]]
    bd_x, bd_y, bd_target = [], [], []
    for i in keep:
        s = t_samples[i]
        if s[2] != yt_clean[i]:
            raise DatasetError(f"{where}: the clean dataset does not match: test sample {i} "
                               f"has true label {s[2]} in the attack result but "
                               f"{int(yt_clean[i])} in the CIFAR-10 copy")
        bd_x.append(_v2_image(s, result_dir, where, f"triggered test sample {i}"))
        bd_y.append(s[2])
        bd_target.append(s[1])
    return x, y, flags, y_true, bd_x, bd_y, bd_target


# ------------------------------------------------------------------------------------------
# v1


def _convert_v1(result: dict, clean_train, clean_test, where: str):
    (x_clean, y_clean), (xt_clean, yt_clean) = clean_train, clean_test
    tr = result["bd_train"]
    if not isinstance(tr, dict) or tr.get("x") is None or tr.get("original_index") is None:
        raise DatasetError(f"{where}: bd_train holds no poisoned training set (x is None)")
    index = np.asarray(tr["original_index"], dtype=np.int64).reshape(-1)
    ys = np.asarray(tr["y"]).reshape(-1)
    if len(ys) != len(index) and tr.get("poison_indicator") is not None:
        # a variant of v1 kept original_index for every sample and a poison indicator
        index = index[np.asarray(tr["poison_indicator"]).reshape(-1) == 1]
    if not len(tr["x"]) == len(ys) == len(index):
        raise DatasetError(f"{where}: unsupported v1 content: bd_train has {len(tr['x'])} "
                           f"images, {len(ys)} labels and {len(index)} indices")
    if len(index) and (index.min() < 0 or index.max() >= len(x_clean)):
        raise DatasetError(f"{where}: the clean dataset does not match: bd_train refers to "
                           f"sample {int(index.max())}, the clean set has {len(x_clean)}")
    x, y = x_clean.copy(), y_clean.copy()
    flags = np.zeros(len(x_clean), dtype=bool)
    for k, i in enumerate(index):
        x[i] = _as_image(tr["x"][k], where, f"poisoned training sample {int(i)}")
        y[i] = int(ys[k])
        flags[i] = True

    te = result["bd_test"]
    t_index = np.asarray(te["original_index"], dtype=np.int64).reshape(-1)
    t_true = np.asarray(te["original_targets"]).reshape(-1)
    t_bd = np.asarray(te["y"]).reshape(-1)
    if not len(te["x"]) == len(t_index) == len(t_true) == len(t_bd):
        raise DatasetError(f"{where}: unsupported v1 content: bd_test's x, y, original_index "
                           "and original_targets differ in length")
    if len(t_index) and (t_index.min() < 0 or t_index.max() >= len(xt_clean)):
        raise DatasetError(f"{where}: the clean dataset does not match: bd_test refers to "
                           f"sample {int(t_index.max())}, the clean test set has "
                           f"{len(xt_clean)}")
    bad = np.flatnonzero(t_true != yt_clean[t_index])
    if len(bad):
        k = int(bad[0])
        raise DatasetError(f"{where}: the clean dataset does not match: test sample "
                           f"{int(t_index[k])} has true label {int(t_true[k])} in the attack "
                           f"result but {int(yt_clean[t_index[k]])} in the CIFAR-10 copy")
    bd_x = [_as_image(img, where, f"triggered test sample {int(t_index[k])}")
            for k, img in enumerate(te["x"])]
    return (x, y, flags, y_clean.copy(), bd_x, [int(v) for v in t_true],
            [int(v) for v in t_bd])


# ------------------------------------------------------------------------------------------


def _clean_dir(result: dict, result_path: Path, dataset_dir) -> Path:
    if dataset_dir is not None:
        return find_batches_dir(dataset_dir)
    stored = str(result.get("data_path") or "")
    candidates = [stored]
    resolved = str(result_path.resolve())
    if "record" in resolved and "data" in stored:  # BackdoorBench's own rule
        candidates.append(resolved[:resolved.index("record")] + stored[stored.index("data"):])
    for c in candidates:
        if c and (find_batches_dir(c) / "test_batch").is_file():
            return find_batches_dir(c)
    raise DatasetError(f"the clean CIFAR-10 of {result_path} is not found at its data_path "
                       f"'{stored}': pass --dataset-dir DIR (the cifar-10-batches-py folder or "
                       "the folder holding it)")


def import_attack_result(path: str | Path, dataset_dir: str | Path | None = None,
                         trust_pickle: bool = False, log=print) -> PoisonedSet:
    """The ``PoisonedSet`` of a BackdoorBench ``attack_result.pt`` (see the module
    docstring)."""
    path = Path(os.path.expanduser(str(path)))
    result = read_attack_result(path, trust_pickle)
    where = str(path)
    version = format_of(result, where)
    dataset = str(result["clean_data"])
    if dataset.lower() != "cifar10":
        raise DatasetError(f"{where}: unsupported dataset '{dataset}': only CIFAR-10 attack "
                           "results are imported (other datasets: write the .npz layout "
                           "yourself, see docs/usage.md)")
    if int(result["num_classes"]) != 10:
        raise DatasetError(f"{where}: num_classes is {result['num_classes']}, not CIFAR-10's "
                           "10")
    size = [int(v) for v in list(result["img_size"])[:2]]
    if size != [32, 32]:
        raise DatasetError(f"{where}: img_size is {list(result['img_size'])}; only CIFAR-10 "
                           "at 32x32 is supported")
    d = _clean_dir(result, path, dataset_dir)
    clean_train, clean_test = load_cifar10(d, True), load_cifar10(d, False)
    try:
        if version == "v2":
            parts = _convert_v2(result, path.parent, clean_train, clean_test, where)
        else:
            parts = _convert_v1(result, clean_train, clean_test, where)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DatasetError(f"{where}: unsupported BackdoorBench {version} content "
                           f"({type(e).__name__}: {one_line(e)})") from None
    x, y, flags, y_true, bd_x, bd_y, bd_target = parts
    targets = sorted(set(bd_target))
    if not bd_x:
        raise DatasetError(f"{where}: bd_test holds no triggered test images")
    if len(targets) != 1:
        shown = ", ".join(map(str, targets[:5])) + (", ..." if len(targets) > 5 else "")
        raise DatasetError(f"{where}: the triggered test images have {len(targets)} poisoned "
                           f"labels ({shown}): all-to-all attacks are not supported (one "
                           "target class is needed)")
    target = targets[0]
    bd_y = np.asarray(bd_y, dtype=np.int64)
    keep = bd_y != target
    if not keep.all():
        log(f"note: {int((~keep).sum())} triggered test images of the target class "
            f"{target} are left out (ASR is measured on non-target images)")
    bd_x = np.stack(bd_x)[keep]
    return PoisonedSet(x, y.astype(np.int64), flags, y_true.astype(np.int64),
                       clean_test[0], clean_test[1], bd_x, bd_y[keep], int(target),
                       list(CLASSES))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.import_backdoorbench",
        description="Convert a BackdoorBench attack_result.pt (v1 or v2 format, CIFAR-10) "
                    "into this project's poisoned-set .npz (docs/usage.md, 'Your own "
                    "poisoned data').")
    parser.add_argument("attack_result", metavar="ATTACK_RESULT",
                        help="BackdoorBench's record/<attack>/attack_result.pt")
    parser.add_argument("out", metavar="OUT", help="the .npz file to write")
    parser.add_argument("--dataset-dir", metavar="DIR",
                        help="the clean CIFAR-10 the attack used (cifar-10-batches-py or the "
                             "folder holding it); default: the file's data_path")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load the file with full pickle (it can run code: trusted files "
                             "only) when it holds objects beyond tensors, arrays and images")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        out = Path(os.path.expanduser(args.out))
        if out.exists() and not args.overwrite:
            raise DatasetError(f"{out} exists; pass --overwrite to replace it")
        ps = import_attack_result(args.attack_result, args.dataset_dir, args.trust_pickle)
        save_npz(out, ps, overwrite=args.overwrite)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 1
    n_p = int(ps.poisoned.sum())
    print(f"wrote {out}: {len(ps.train_images)} training images ({n_p} poisoned), "
          f"{len(ps.test_images)} test images, {len(ps.bd_images)} triggered test images, "
          f"target {ps.target_label} ({ps.classes[ps.target_label]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
