"""Already-poisoned datasets made elsewhere (another attack's output), as one ``PoisonedSet``.

Two on-disk layouts are read by ``load_poisoned_set(path)``:

* a ``.npz`` archive (``save_npz`` writes it; read with ``allow_pickle=False``):

  ============== ====================== ============================================
  key            dtype, shape           meaning
  ============== ====================== ============================================
  x_train        uint8 [N, H, W, 3]     training images, poisoned ones included
  y_train        integer [N]            their labels as given (the attacker's)
  x_test         uint8 [M, H, W, 3]     the clean test set
  y_test         integer [M]            its labels
  x_bd_test      uint8 [B, H, W, 3]     triggered test images (B ≥ 1)
  y_bd_test      integer [B]            their TRUE labels, none equal to the target
  target_label   integer, 0-d           the attack's target class
  poisoned       bool or 0/1 [N]        optional: ground-truth poison flags
  y_train_true   integer [N]            optional: the true classes of x_train
  classes        str [C]                optional: class names (default "0" .. "C-1")
  ============== ====================== ============================================

  C is ``len(classes)`` when given, else the largest label of all label arrays + 1; C ≥ 2.
  H and W are at least 32 and the same in the three image arrays. Other keys are errors.

* an image folder: ``train/<class>/*``, ``test/<class>/*``, ``bd_test/<class>/*`` (the
  triggered images sorted under their TRUE class) and ``meta.json``. The class indices are
  the sorted class folder names of ``train/`` (``test/`` must have the same names, ``bd_test/``
  a subset of them). ``meta.json`` holds ``"target"`` (a class name or index) and, optionally,
  ``"poisoned"``: the training files that are poisoned, relative to ``train/`` with ``/``
  separators (``"cat/img3.png"``); the others are clean, and without the key the flags are
  unknown. Training images lie in the folder of their given (possibly poisoned) label. All
  images are decoded at once into arrays, so they must all have the same size: this loader
  does not resize (a folder of mixed sizes is an error that says so).

Every problem is a ``utils.errors.DatasetError`` of one line naming the path and the part.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import DatasetError, one_line

from .imagefolder import read_image, scan_split

MIN_SIZE = 32
NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test", "x_bd_test", "y_bd_test",
                "target_label")
NPZ_OPTIONAL = ("poisoned", "y_train_true", "classes")
FOLDER_SPLITS = ("train", "test", "bd_test")

# what each part is called in the messages of either layout
NPZ_NAMES = {k: k for k in NPZ_REQUIRED + NPZ_OPTIONAL}
FOLDER_NAMES = {"x_train": "train/", "y_train": "train/ labels", "x_test": "test/",
                "y_test": "test/ labels", "x_bd_test": "bd_test/", "y_bd_test": "bd_test/ labels",
                "target_label": "meta.json 'target'", "poisoned": "meta.json 'poisoned'",
                "y_train_true": "true training labels", "classes": "class folders"}


@dataclass(eq=False)
class PoisonedSet:
    """A poisoned training set, the clean test set and the triggered test set.

    ``train_labels`` are the labels as given (poisoned samples carry the attacker's label);
    ``poisoned`` and ``train_true_labels`` are None when unknown. ``bd_labels`` are the TRUE
    labels of the triggered test images ``bd_images``: the attack succeeds on one when the
    model predicts ``target_label``.
    """

    train_images: np.ndarray            # uint8 [N, H, W, 3]
    train_labels: np.ndarray            # int64 [N]
    poisoned: np.ndarray | None         # bool [N]
    train_true_labels: np.ndarray | None  # int64 [N]
    test_images: np.ndarray             # uint8 [M, H, W, 3]
    test_labels: np.ndarray             # int64 [M]
    bd_images: np.ndarray               # uint8 [B, H, W, 3]
    bd_labels: np.ndarray               # int64 [B], true labels
    target_label: int
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self):
        n_p = "unknown" if self.poisoned is None else int(np.sum(self.poisoned))
        return (f"PoisonedSet({len(self.train_images)} training images ({n_p} poisoned), "
                f"{len(self.test_images)} test, {len(self.bd_images)} triggered, "
                f"{self.num_classes} classes, target {self.target_label})")


# ------------------------------------------------------------------------------------------
# validation


def _check_images(where: str, name: str, x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray):
        raise DatasetError(f"{where}: {name} must be an array, got {type(x).__name__}")
    if x.dtype != np.uint8:
        raise DatasetError(f"{where}: {name} must be uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[3] != 3:
        raise DatasetError(f"{where}: {name} must have shape [N, H, W, 3] (NHWC, RGB), got "
                           f"{list(x.shape)}")
    if len(x) == 0:
        raise DatasetError(f"{where}: {name} holds no images")
    if min(x.shape[1:3]) < MIN_SIZE:
        raise DatasetError(f"{where}: {name} images are {x.shape[1]}x{x.shape[2]}; at least "
                           f"{MIN_SIZE}x{MIN_SIZE} pixels are needed")


def _check_labels(where: str, name: str, y, n: int, image_name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: {name} must hold integer labels, got dtype {y.dtype}")
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{where}: {name} must have shape [{n}] (one label per image of "
                           f"{image_name}), got {list(y.shape)}")
    return y.astype(np.int64)


def _check_flags(where: str, name: str, flags, n: int) -> np.ndarray:
    f = np.asarray(flags)
    if f.ndim != 1 or len(f) != n:
        raise DatasetError(f"{where}: {name} must have shape [{n}] (one flag per training "
                           f"image), got {list(f.shape)}")
    if f.dtype == np.bool_:
        return f.copy()
    if np.issubdtype(f.dtype, np.integer) and np.isin(f, (0, 1)).all():
        return f.astype(bool)
    raise DatasetError(f"{where}: {name} must be booleans or 0/1 integers, got dtype {f.dtype}"
                       + ("" if not np.issubdtype(f.dtype, np.integer) else " with other values"))


def validate(ps: PoisonedSet, where: str, names: dict[str, str] = NPZ_NAMES) -> PoisonedSet:
    """Check every part of ``ps``; return it with labels as int64 and flags as bool.

    ``where`` (the path) starts each message, ``names`` says what the parts are called there.
    """
    n = names
    for key, x in (("x_train", ps.train_images), ("x_test", ps.test_images),
                   ("x_bd_test", ps.bd_images)):
        _check_images(where, n[key], x)
    sizes = {n[k]: x.shape[1:3] for k, x in (("x_train", ps.train_images),
                                               ("x_test", ps.test_images),
                                               ("x_bd_test", ps.bd_images))}
    if len(set(sizes.values())) > 1:
        described = ", ".join(f"{k} {h}x{w}" for k, (h, w) in sizes.items())
        raise DatasetError(f"{where}: the image sizes differ between parts ({described}); "
                           "all must share one height and width")
    y_train = _check_labels(where, n["y_train"], ps.train_labels, len(ps.train_images),
                            n["x_train"])
    y_test = _check_labels(where, n["y_test"], ps.test_labels, len(ps.test_images), n["x_test"])
    y_bd = _check_labels(where, n["y_bd_test"], ps.bd_labels, len(ps.bd_images), n["x_bd_test"])
    y_true = None
    if ps.train_true_labels is not None:
        y_true = _check_labels(where, n["y_train_true"], ps.train_true_labels,
                               len(ps.train_images), n["x_train"])
    classes = list(ps.classes)
    if len(classes) < 2:
        raise DatasetError(f"{where}: {n['classes']}: at least 2 classes are needed, got "
                           f"{len(classes)}")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise DatasetError(f"{where}: {n['classes']}: class name '{dup}' appears twice")
    c = len(classes)
    for key, y in (("y_train", y_train), ("y_test", y_test), ("y_bd_test", y_bd),
                   ("y_train_true", y_true)):
        if y is not None and (y.min() < 0 or y.max() >= c):
            bad = int(y[(y < 0) | (y >= c)][0])
            raise DatasetError(f"{where}: {n[key]} holds label {bad}, outside [0, {c}) "
                               f"({c} classes)")
    flags = None
    if ps.poisoned is not None:
        flags = _check_flags(where, n["poisoned"], ps.poisoned, len(ps.train_images))
    t = ps.target_label
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
        raise DatasetError(f"{where}: {n['target_label']} must be an integer class index, got "
                           f"{t!r}")
    if not 0 <= int(t) < c:
        raise DatasetError(f"{where}: {n['target_label']} is {int(t)}, outside [0, {c}) "
                           f"({c} classes)")
    on_target = int((y_bd == int(t)).sum())
    if on_target:
        raise DatasetError(f"{where}: {n['y_bd_test']}: {on_target} of the triggered test images "
                           f"have the target {int(t)} as their true label; ASR is measured on "
                           "non-target images only, remove them")
    return PoisonedSet(ps.train_images, y_train, flags, y_true, ps.test_images, y_test,
                       ps.bd_images, y_bd, int(t), [str(x) for x in classes])


# ------------------------------------------------------------------------------------------
# .npz layout

_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except _NPZ_READ_ERRORS as e:  # not an archive, truncated, pickled data, unreadable
        reason = ("it is neither an .npz archive nor an array; pickled data are not read"
                  if "pickle" in str(e) else f"{type(e).__name__}: {one_line(e)}")
        raise DatasetError(f"poisoned set {path} cannot be read as an .npz archive "
                           f"({reason})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DatasetError(f"poisoned set {path} is a single .npy array, not an .npz archive "
                           f"with the keys {', '.join(NPZ_REQUIRED)}")
    with z:
        keys = list(z.files)
        unknown = sorted(set(keys) - set(NPZ_REQUIRED + NPZ_OPTIONAL))
        if unknown:
            raise DatasetError(f"poisoned set {path}: unknown key '{unknown[0]}' (known: "
                               f"{', '.join(NPZ_REQUIRED + NPZ_OPTIONAL)})")
        missing = [k for k in NPZ_REQUIRED if k not in keys]
        if missing:
            raise DatasetError(f"poisoned set {path}: key '{missing[0]}' is missing")
        out = {}
        for k in keys:
            try:
                out[k] = z[k]
            except _NPZ_READ_ERRORS as e:
                hint = (" (object arrays are not read: classes must be a str array)"
                        if "allow_pickle" in str(e) else "")
                raise DatasetError(f"poisoned set {path}: key '{k}' cannot be read "
                                   f"({type(e).__name__}: {one_line(e)}){hint}") from None
        return out


def _load_npz(path: Path) -> PoisonedSet:
    where = f"poisoned set {path}"
    z = _read_npz(path)
    target = z["target_label"]
    if target.ndim != 0 or target.dtype == np.bool_ or not np.issubdtype(target.dtype,
                                                                         np.integer):
        raise DatasetError(f"{where}: target_label must be a 0-d integer array (a class "
                           f"index), got dtype {target.dtype} and shape {list(target.shape)}")
    if "classes" in z:
        cls = z["classes"]
        if cls.dtype.kind != "U" or cls.ndim != 1:
            raise DatasetError(f"{where}: classes must be a 1-d str array, got dtype "
                               f"{cls.dtype} and shape {list(cls.shape)}")
        classes = [str(c) for c in cls]
    else:
        top = -1
        for k in ("y_train", "y_test", "y_bd_test", "y_train_true"):
            y = z.get(k)
            if y is not None and y.size and np.issubdtype(y.dtype, np.integer) \
                    and y.dtype != np.bool_:
                top = max(top, int(y.max()))
        classes = [str(i) for i in range(top + 1)]
    ps = PoisonedSet(z["x_train"], z["y_train"], z.get("poisoned"), z.get("y_train_true"),
                     z["x_test"], z["y_test"], z["x_bd_test"], z["y_bd_test"], target[()],
                     classes)
    return validate(ps, where, NPZ_NAMES)


def save_npz(path: str | Path, ps: PoisonedSet, overwrite: bool = False) -> Path:
    """Write ``ps`` as the .npz layout, atomically (a temporary file beside ``path``, then
    ``os.replace``); an existing ``path`` is replaced only with ``overwrite=True``."""
    path = Path(os.path.expanduser(str(path)))
    ps = validate(ps, f"poisoned set to write to {path}", NPZ_NAMES)
    if path.is_dir():
        raise DatasetError(f"cannot write the poisoned set to {path}: it is a folder")
    if path.exists() and not overwrite:
        raise DatasetError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise DatasetError(f"cannot write the poisoned set to {path}: folder {path.parent} "
                           "does not exist")
    arrays = {"x_train": ps.train_images, "y_train": ps.train_labels,
              "x_test": ps.test_images, "y_test": ps.test_labels,
              "x_bd_test": ps.bd_images, "y_bd_test": ps.bd_labels,
              "target_label": np.asarray(ps.target_label, dtype=np.int64),
              "classes": np.asarray(ps.classes, dtype=str)}
    if ps.poisoned is not None:
        arrays["poisoned"] = ps.poisoned
    if ps.train_true_labels is not None:
        arrays["y_train_true"] = ps.train_true_labels
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a temporary file is private; the set is not
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise DatasetError(f"cannot write the poisoned set to {path} "
                           f"({type(e).__name__}: {one_line(e)})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


# ------------------------------------------------------------------------------------------
# image-folder layout


def _decode_all(paths: list[str], where: str) -> np.ndarray:
    images, first = [], None
    for p in paths:
        img = read_image(p)
        if first is None:
            first = (p, img.shape[:2])
        elif img.shape[:2] != first[1]:
            (h0, w0), (h, w) = first[1], img.shape[:2]
            raise DatasetError(f"{where}: the images differ in size ({first[0]} is {h0}x{w0}, "
                               f"{p} is {h}x{w}); resize them all to one size first (this "
                               "loader does not resize)")
        images.append(img)
    return np.stack(images)


def _read_meta(root: Path) -> dict:
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(f"poisoned set {root}: meta.json is missing (it names the target: "
                           '{"target": "<class name or index>"})')
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"poisoned set {meta_path} cannot be read as JSON "
                           f"({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"poisoned set {meta_path} must hold a JSON object, got "
                           f"{type(meta).__name__}")
    unknown = sorted(set(meta) - {"target", "poisoned"})
    if unknown:
        raise DatasetError(f"poisoned set {meta_path}: unknown key '{unknown[0]}' (known: "
                           "target, poisoned)")
    if "target" not in meta:
        raise DatasetError(f"poisoned set {meta_path}: key 'target' is missing (a class "
                           "name or index)")
    return meta


def _load_folder(root: Path) -> PoisonedSet:
    where = f"poisoned set {root}"
    for split in FOLDER_SPLITS:
        if not (root / split).is_dir():
            raise DatasetError(f"{where}: folder '{split}/' is missing (expected "
                               f"{root}/{split}/<class>/*)")
    meta = _read_meta(root)
    train_paths, train_y, classes = scan_split(root, "train")
    test_paths, test_y, test_classes = scan_split(root, "test")
    if test_classes != classes:
        odd = sorted(set(classes) ^ set(test_classes))[0]
        raise DatasetError(f"{where}: the class folders of train/ and test/ differ (e.g. "
                           f"'{odd}')")
    bd_paths, bd_local, bd_classes = scan_split(root, "bd_test")
    extra = sorted(set(bd_classes) - set(classes))
    if extra:
        raise DatasetError(f"{where}: bd_test/ has class folder '{extra[0]}', which train/ "
                           "does not have")
    bd_y = np.asarray([classes.index(bd_classes[i]) for i in bd_local], dtype=np.int64)

    target = meta["target"]
    if isinstance(target, str):
        if target not in classes:
            raise DatasetError(f"{where}: meta.json 'target' is '{target}', not one of the "
                               f"classes ({', '.join(classes)})")
        target = classes.index(target)
    elif isinstance(target, bool) or not isinstance(target, int):
        raise DatasetError(f"{where}: meta.json 'target' must be a class name or index, got "
                           f"{target!r}")

    flags = None
    if "poisoned" in meta:
        listed = meta["poisoned"]
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise DatasetError(f"{where}: meta.json 'poisoned' must be a list of file paths "
                               "relative to train/ (e.g. \"cat/img3.png\")")
        rel = {Path(p).relative_to(root / "train").as_posix(): i
               for i, p in enumerate(train_paths)}
        flags = np.zeros(len(train_paths), dtype=bool)
        for p in listed:
            i = rel.get(Path(p).as_posix().removeprefix("./"))
            if i is None:
                raise DatasetError(f"{where}: meta.json 'poisoned' lists '{p}', which is not "
                                   "an image under train/")
            flags[i] = True

    x_train = _decode_all(train_paths, f"{where}: train/")
    x_test = _decode_all(test_paths, f"{where}: test/")
    x_bd = _decode_all(bd_paths, f"{where}: bd_test/")
    ps = PoisonedSet(x_train, train_y, flags, None, x_test, test_y, x_bd, bd_y, target,
                     classes)
    return validate(ps, where, FOLDER_NAMES)


# ------------------------------------------------------------------------------------------


def load_poisoned_set(path: str | Path) -> PoisonedSet:
    """Read a poisoned set: a ``.npz`` file or an image folder (see the module docstring)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return _load_folder(p)
    if p.is_file():
        return _load_npz(p)
    raise DatasetError(f"poisoned set not found: {p} (expected a .npz file, or a folder with "
                       "train/, test/, bd_test/ and meta.json)")
