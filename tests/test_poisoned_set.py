"""data.poisoned_set: the .npz and image-folder layouts of an already-poisoned dataset, their
round trips, and one clear DatasetError line for each malformed part."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.poisoned_set import PoisonedSet, load_poisoned_set, save_npz
from utils.errors import DatasetError

CLASSES = ["bird", "cat", "dog"]
TARGET = 1


def make_set(n=12, m=6, b=4, h=32, w=36, seed=0, optional=True) -> PoisonedSet:
    rng = np.random.default_rng(seed)
    y_true = np.arange(n) % 3
    flags = np.zeros(n, dtype=bool)
    flags[[2, 5, 9]] = True
    y = np.where(flags, TARGET, y_true)
    bd_labels = np.array([0, 2] * (b // 2) + [0] * (b % 2))
    return PoisonedSet(
        train_images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        train_labels=y.astype(np.int64),
        poisoned=flags if optional else None,
        train_true_labels=y_true.astype(np.int64) if optional else None,
        test_images=rng.integers(0, 256, (m, h, w, 3), dtype=np.uint8),
        test_labels=(np.arange(m) % 3).astype(np.int64),
        bd_images=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
        bd_labels=bd_labels.astype(np.int64),
        target_label=TARGET,
        classes=list(CLASSES) if optional else ["0", "1", "2"])


def arrays_of(ps: PoisonedSet) -> dict:
    return {"x_train": ps.train_images, "y_train": ps.train_labels, "x_test": ps.test_images,
            "y_test": ps.test_labels, "x_bd_test": ps.bd_images, "y_bd_test": ps.bd_labels,
            "target_label": np.asarray(ps.target_label), "poisoned": ps.poisoned,
            "y_train_true": ps.train_true_labels, "classes": np.asarray(ps.classes)}


def assert_same(a: PoisonedSet, b: PoisonedSet) -> None:
    for name in ("train_images", "train_labels", "poisoned", "train_true_labels",
                 "test_images", "test_labels", "bd_images", "bd_labels"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.target_label == b.target_label and a.classes == b.classes


def assert_one_line_error(excinfo, path, match) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert match in msg, msg


# ------------------------------------------------------------------------------------------
# .npz


def test_npz_round_trip(tmp_path):
    ps = make_set()
    out = save_npz(tmp_path / "set.npz", ps)
    back = load_poisoned_set(out)
    assert_same(back, ps)
    assert back.train_labels.dtype == np.int64 and back.poisoned.dtype == np.bool_
    assert back.num_classes == 3
    assert [p.name for p in tmp_path.iterdir()] == ["set.npz"]  # no temporary file left


def test_npz_without_optional_keys(tmp_path):
    ps = make_set(optional=False)
    arrays = {k: v for k, v in arrays_of(ps).items() if v is not None and k != "classes"}
    arrays["y_train"] = arrays["y_train"].astype(np.int32)  # any integer dtype is accepted
    np.savez(tmp_path / "s.npz", **arrays)
    back = load_poisoned_set(tmp_path / "s.npz")
    assert back.poisoned is None and back.train_true_labels is None
    assert back.classes == ["0", "1", "2"]  # max label + 1 classes
    assert back.train_labels.dtype == np.int64
    assert_same(back, ps)


def test_npz_flags_as_integers(tmp_path):
    ps = make_set()
    arrays = arrays_of(ps)
    arrays["poisoned"] = ps.poisoned.astype(np.uint8)
    np.savez(tmp_path / "s.npz", **arrays)
    back = load_poisoned_set(tmp_path / "s.npz")
    assert back.poisoned.dtype == np.bool_
    np.testing.assert_array_equal(back.poisoned, ps.poisoned)


def test_save_npz_does_not_overwrite(tmp_path):
    ps = make_set()
    path = save_npz(tmp_path / "set.npz", ps)
    before = path.read_bytes()
    with pytest.raises(DatasetError) as e:
        save_npz(path, make_set(seed=1))
    assert_one_line_error(e, path, "exists; pass overwrite=True")
    assert path.read_bytes() == before
    save_npz(path, make_set(seed=1), overwrite=True)
    assert_same(load_poisoned_set(path), make_set(seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.npz"]


def test_save_npz_refuses_an_invalid_set(tmp_path):
    ps = make_set()
    ps.train_labels = ps.train_labels + 5
    with pytest.raises(DatasetError, match="y_train holds label"):
        save_npz(tmp_path / "set.npz", ps)
    assert not any(tmp_path.iterdir())


def _edit(**changes):
    def apply(a):
        for k, v in changes.items():
            if v is None:
                a.pop(k)
            else:
                a[k] = v(a) if callable(v) else v
        return a
    return apply


MALFORMED_NPZ = {
    "float images": (_edit(x_train=lambda a: a["x_train"].astype(np.float32)),
                     "x_train must be uint8 images"),
    "NCHW images": (_edit(x_test=lambda a: a["x_test"].transpose(0, 3, 1, 2)),
                    "x_test must have shape [N, H, W, 3]"),
    "grey images": (_edit(x_train=lambda a: a["x_train"][..., 0]),
                    "x_train must have shape [N, H, W, 3]"),
    "sizes differ": (_edit(x_bd_test=lambda a: np.zeros((4, 40, 40, 3), np.uint8)),
                     "image sizes differ between parts"),
    "small images": (_edit(x_train=lambda a: a["x_train"][:, :16, :16],
                           x_test=lambda a: a["x_test"][:, :16, :16],
                           x_bd_test=lambda a: a["x_bd_test"][:, :16, :16]),
                     "at least 32x32"),
    "float labels": (_edit(y_train=lambda a: a["y_train"].astype(np.float32)),
                     "y_train must hold integer labels"),
    "bool labels": (_edit(y_test=lambda a: a["y_test"] > 0), "y_test must hold integer"),
    "label count": (_edit(y_test=lambda a: a["y_test"][:-1]), "y_test must have shape [6]"),
    "label range": (_edit(y_train=lambda a: np.where(np.arange(12) == 3, 3, a["y_train"])),
                    "y_train holds label 3, outside [0, 3)"),
    "negative label": (_edit(y_bd_test=lambda a: -a["y_bd_test"] - 1, classes=None),
                       "y_bd_test holds label -1"),
    "true label range": (_edit(y_train_true=lambda a: a["y_train_true"] + 3),
                         "y_train_true holds label"),
    "flags length": (_edit(poisoned=lambda a: a["poisoned"][:5]),
                     "poisoned must have shape [12]"),
    "flags values": (_edit(poisoned=lambda a: a["poisoned"].astype(np.int64) * 2),
                     "poisoned must be booleans or 0/1"),
    "flags float": (_edit(poisoned=lambda a: a["poisoned"].astype(np.float32)),
                    "poisoned must be booleans or 0/1"),
    "no triggered set": (_edit(x_bd_test=None), "key 'x_bd_test' is missing"),
    "empty triggered set": (_edit(x_bd_test=np.zeros((0, 32, 36, 3), np.uint8),
                                  y_bd_test=np.zeros(0, np.int64)),
                            "x_bd_test holds no images"),
    "missing labels": (_edit(y_train=None), "key 'y_train' is missing"),
    "missing target": (_edit(target_label=None), "key 'target_label' is missing"),
    "target range": (_edit(target_label=np.asarray(7)), "target_label is 7, outside [0, 3)"),
    "target shape": (_edit(target_label=np.asarray([1])), "target_label must be a 0-d integer"),
    "target float": (_edit(target_label=np.asarray(1.0)), "target_label must be a 0-d integer"),
    "triggered target": (_edit(y_bd_test=lambda a: np.full(4, TARGET)),
                         "ASR is measured on non-target images"),
    "unknown key": (_edit(poison=lambda a: a["poisoned"]), "unknown key 'poison'"),
    "one class": (_edit(classes=np.asarray(["a"])), "at least 2 classes"),
    "duplicate class": (_edit(classes=np.asarray(["a", "b", "a"])), "'a' appears twice"),
    "numeric classes": (_edit(classes=np.arange(3)), "classes must be a 1-d str array"),
    "object classes": (_edit(classes=np.asarray(["a", "b", "c"], dtype=object)),
                       "key 'classes' cannot be read"),
}


@pytest.mark.parametrize("case", list(MALFORMED_NPZ))
def test_malformed_npz_is_one_line(tmp_path, case):
    edit, match = MALFORMED_NPZ[case]
    path = tmp_path / "bad.npz"
    arrays = edit(arrays_of(make_set()))
    np.savez(path, **arrays)  # object arrays are pickled on write, refused on read
    with pytest.raises(DatasetError) as e:
        load_poisoned_set(path)
    assert_one_line_error(e, path, match)


def _truncated(path):
    np.savez(path, **arrays_of(make_set()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_member(path):
    np.savez_compressed(path, **arrays_of(make_set()))
    data = bytearray(path.read_bytes())
    for i in range(200, 600):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


CORRUPT = {
    "truncated": (_truncated, "cannot be read"),
    "corrupt member": (_corrupt_member, "cannot be read"),
    "random bytes": (lambda p: p.write_bytes(bytes(range(256)) * 8), "cannot be read"),
    "empty file": (lambda p: p.write_bytes(b""), "cannot be read"),
    "pickle": (lambda p: p.write_bytes(pickle.dumps({"x_train": 1})), "cannot be read"),
    "single .npy": (lambda p: p.write_bytes(_npy_bytes(np.zeros(3))), "single .npy array"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_npz_is_one_line(tmp_path, case):
    write, match = CORRUPT[case]
    path = tmp_path / "bad.npz"
    write(path)
    with pytest.raises(DatasetError) as e:
        load_poisoned_set(path)
    assert_one_line_error(e, path, match)


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_poisoned_set(tmp_path / "nope.npz")
    assert_one_line_error(e, tmp_path / "nope.npz", "poisoned set not found")


# ------------------------------------------------------------------------------------------
# image folder


def write_folder(root: Path, ps: PoisonedSet, meta: dict | None = None) -> Path:
    """The folder layout of ``ps`` as PNGs (lossless); file names keep the arrays' order
    within a class folder. Returns ``root``."""
    def dump(split, images, labels):
        for i, (img, y) in enumerate(zip(images, labels)):
            d = root / split / ps.classes[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"img{i:03d}.png")
    dump("train", ps.train_images, ps.train_labels)
    dump("test", ps.test_images, ps.test_labels)
    dump("bd_test", ps.bd_images, ps.bd_labels)
    if meta is None:
        meta = {"target": ps.classes[ps.target_label],
                "poisoned": [f"{ps.classes[ps.train_labels[i]]}/img{i:03d}.png"
                             for i in np.flatnonzero(ps.poisoned)]}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def folder_order(labels: np.ndarray) -> np.ndarray:
    """The order the loader reads a split in: by class, then by file name (= index)."""
    return np.lexsort((np.arange(len(labels)), labels))


def test_folder_layout_loads(tmp_path):
    ps = make_set(h=34, w=40)
    back = load_poisoned_set(write_folder(tmp_path / "set", ps))
    o, ot, ob = (folder_order(ps.train_labels), folder_order(ps.test_labels),
                 folder_order(ps.bd_labels))
    np.testing.assert_array_equal(back.train_images, ps.train_images[o])
    np.testing.assert_array_equal(back.train_labels, ps.train_labels[o])
    np.testing.assert_array_equal(back.poisoned, ps.poisoned[o])
    assert back.train_true_labels is None
    np.testing.assert_array_equal(back.test_images, ps.test_images[ot])
    np.testing.assert_array_equal(back.test_labels, ps.test_labels[ot])
    np.testing.assert_array_equal(back.bd_images, ps.bd_images[ob])
    np.testing.assert_array_equal(back.bd_labels, ps.bd_labels[ob])
    assert back.target_label == TARGET and back.classes == CLASSES
    assert back.train_images.dtype == np.uint8 and back.train_images.shape[1:] == (34, 40, 3)


def test_folder_round_trips_through_npz(tmp_path):
    """folder → PoisonedSet → save_npz → load gives the same arrays."""
    back = load_poisoned_set(write_folder(tmp_path / "set", make_set()))
    again = load_poisoned_set(save_npz(tmp_path / "set.npz", back))
    assert_same(again, back)


def test_folder_target_by_index_and_unknown_flags(tmp_path):
    ps = make_set()
    back = load_poisoned_set(write_folder(tmp_path / "set", ps, meta={"target": TARGET}))
    assert back.target_label == TARGET and back.poisoned is None


def test_folder_bd_test_may_lack_classes(tmp_path):
    ps = make_set(b=3)
    ps.bd_labels = np.array([2, 2, 2])
    back = load_poisoned_set(write_folder(tmp_path / "set", ps))
    np.testing.assert_array_equal(back.bd_labels, [2, 2, 2])  # index in train's classes


def _meta(m):
    return lambda root: (root / "meta.json").write_text(json.dumps(m))


def _png(path, size=(32, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(path)


def _rm_tree(path: Path):
    import shutil
    shutil.rmtree(path)


MALFORMED_FOLDER = {
    "no bd_test": (lambda r: _rm_tree(r / "bd_test"), "folder 'bd_test/' is missing"),
    "empty bd_test": (lambda r: [_rm_tree(p) for p in (r / "bd_test").iterdir()],
                      "bd_test holds no class folders"),
    "no meta": (lambda r: (r / "meta.json").unlink(), "meta.json is missing"),
    "bad json": (lambda r: (r / "meta.json").write_text("{target: 1"), "cannot be read as JSON"),
    "meta list": (_meta([1]), "must hold a JSON object"),
    "meta unknown key": (_meta({"target": 1, "poison": []}), "unknown key 'poison'"),
    "no target": (_meta({"poisoned": []}), "key 'target' is missing"),
    "unknown target": (_meta({"target": "horse"}), "'target' is 'horse', not one of"),
    "target range": (_meta({"target": 3}), "meta.json 'target' is 3, outside [0, 3)"),
    "target float": (_meta({"target": 1.5}), "must be a class name or index"),
    "flags not list": (_meta({"target": 1, "poisoned": "cat/img002.png"}),
                       "'poisoned' must be a list of file paths"),
    "flags unknown file": (_meta({"target": 1, "poisoned": ["cat/nope.png"]}),
                           "lists 'cat/nope.png', which is not an image under train/"),
    "bd extra class": (lambda r: _png(r / "bd_test" / "horse" / "a.png"),
                       "bd_test/ has class folder 'horse'"),
    "test classes": (lambda r: _png(r / "test" / "horse" / "a.png"),
                     "class folders of train/ and test/ differ"),
    "mixed sizes": (lambda r: _png(r / "train" / "cat" / "zz.png", (40, 40)),
                    "differ in size"),
    "small images": (lambda r: [_png(p, (16, 16)) for p in r.rglob("*.png")],
                     "at least 32x32"),
    "sizes differ between parts": (lambda r: [_png(p, (48, 48))
                                              for p in (r / "test").rglob("*.png")],
                                   "image sizes differ between parts"),
    "triggered target": (lambda r: _png(r / "bd_test" / "cat" / "a.png"),
                         "ASR is measured on non-target images"),
    "unreadable image": (lambda r: (r / "train" / "dog" / "img008.png").write_bytes(b"no"),
                         "cannot read image"),
}


@pytest.mark.parametrize("case", list(MALFORMED_FOLDER))
def test_malformed_folder_is_one_line(tmp_path, case):
    edit, match = MALFORMED_FOLDER[case]
    root = write_folder(tmp_path / "set", make_set())
    edit(root)
    with pytest.raises(DatasetError) as e:
        load_poisoned_set(root)
    assert_one_line_error(e, root, match)
