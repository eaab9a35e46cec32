"""data.import_backdoorbench on attack results built here in BackdoorBench's v2 (and v1)
format with torch.save: the rebuilt training set, flags, labels and triggered test set, exactly;
and the command's errors as one line with exit status 1."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.cifar import CLASSES, load_cifar10
from data.import_backdoorbench import main
from data.poisoned_set import load_poisoned_set
from tests.conftest import REPO_ROOT, write_fake_cifar

TARGET = 0
POISONED = [3, 7, 12, 30, 41]


def trigger(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[-3:, -3:] = 255
    return out


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("bb_cifar"), n_train=50, n_test=20, seed=3)


def expected(cifar: Path) -> dict:
    """What the converter must produce from the results ``build_*`` write."""
    x, y = load_cifar10(cifar, True)
    xt, yt = load_cifar10(cifar, False)
    flags = np.zeros(len(x), dtype=bool)
    flags[POISONED] = True
    x_p = x.copy()
    x_p[POISONED] = [trigger(x[i]) for i in POISONED]
    keep = np.flatnonzero(yt != TARGET)
    return {"x_train": x_p, "y_train": np.where(flags, TARGET, y), "poisoned": flags,
            "y_train_true": y, "x_test": xt, "y_test": yt,
            "x_bd_test": np.stack([trigger(xt[i]) for i in keep]), "y_bd_test": yt[keep],
            "bd_index": keep}


def _state(n, chosen, samples, save_folder, subset=None):
    """A prepro_cls_DatasetBD_v2.retrieve_state() as BackdoorBench writes it."""
    indicator = np.zeros(n)  # float, as generate_poison_index_from_label_transform makes it
    indicator[chosen] = 1
    index = np.arange(n) if subset is None else np.arange(n)[subset]
    return {"bd_data_container": {"save_folder_path": save_folder, "data_dict": samples,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False,
            "original_index_array": index, "poison_indicator": indicator,
            "save_folder_path": save_folder}


def _container(record: Path, name: str, items, on_disk: bool) -> tuple[dict, str | None]:
    """data_dict of (index, image, poisoned label, true label) items: PIL images in memory,
    or PNG files under ``record/name/<true label>/<index>.png`` named by a relative path as
    BackdoorBench 2.2 stores it."""
    folder = f"./record/attack_x/{name}" if on_disk else None
    data = {}
    for i, img, bd_label, label in items:
        key = np.int64(i)  # BackdoorBench iterates over an np.arange
        if on_disk:
            f = record / name / str(label) / f"{i}.png"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(f)
            data[key] = {"path": f"{folder}/{label}/{i}.png", "other_info": [bd_label, label]}
        else:
            data[key] = (Image.fromarray(img), bd_label, label)
    return data, folder


def build_v2(record: Path, cifar: Path, on_disk: bool = True, edit=None) -> Path:
    """record/attack_result.pt (and its image folders) in BackdoorBench v2's format."""
    record.mkdir(parents=True, exist_ok=True)
    x, y = load_cifar10(cifar, True)
    xt, yt = load_cifar10(cifar, False)
    train_items = [(i, trigger(x[i]), TARGET, int(y[i])) for i in POISONED]
    bd_index = np.flatnonzero(yt != TARGET)
    test_items = [(int(i), trigger(xt[i]), TARGET, int(yt[i])) for i in bd_index]
    tr, tr_folder = _container(record, "bd_train_dataset", train_items, on_disk)
    te, te_folder = _container(record, "bd_test_dataset", test_items, on_disk)
    result = {"model_name": "preactresnet18", "num_classes": 10,
              "model": OrderedDict(w=torch.zeros(2, 2)), "data_path": "./data/cifar10",
              "img_size": (32, 32, 3), "clean_data": "cifar10",
              "bd_train": _state(len(x), POISONED, tr, tr_folder),
              "bd_test": _state(len(xt), bd_index, te, te_folder, subset=bd_index)}
    if edit is not None:
        edit(result)
    torch.save(result, record / "attack_result.pt")
    return record / "attack_result.pt"


def build_v1(record: Path, cifar: Path) -> Path:
    """record/attack_result.pt in BackdoorBench v1's format: lists of PIL images."""
    record.mkdir(parents=True, exist_ok=True)
    x, y = load_cifar10(cifar, True)
    xt, yt = load_cifar10(cifar, False)
    bd_index = np.flatnonzero(yt != TARGET)
    result = {"model_name": "preactresnet18", "num_classes": 10,
              "model": OrderedDict(w=torch.zeros(2)), "data_path": "./data/cifar10",
              "img_size": [32, 32, 3], "clean_data": "cifar10",
              "bd_train": {"x": [Image.fromarray(trigger(x[i])) for i in POISONED],
                           "y": np.full(len(POISONED), TARGET),
                           "original_index": np.array(POISONED)},
              "bd_test": {"x": [Image.fromarray(trigger(xt[i])) for i in bd_index],
                          "y": np.full(len(bd_index), TARGET), "original_index": bd_index,
                          "original_targets": yt[bd_index]}}
    torch.save(result, record / "attack_result.pt")
    return record / "attack_result.pt"


def assert_converted(out: Path, exp: dict) -> None:
    ps = load_poisoned_set(out)
    for key, got in (("x_train", ps.train_images), ("y_train", ps.train_labels),
                     ("poisoned", ps.poisoned), ("y_train_true", ps.train_true_labels),
                     ("x_test", ps.test_images), ("y_test", ps.test_labels),
                     ("x_bd_test", ps.bd_images), ("y_bd_test", ps.bd_labels)):
        np.testing.assert_array_equal(got, exp[key], err_msg=key)
    assert ps.target_label == TARGET and ps.classes == list(CLASSES)


def run_main(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("on_disk", [True, False], ids=["images-on-disk", "images-in-memory"])
def test_v2_result_converts_exactly(tmp_path, cifar, capsys, monkeypatch, on_disk):
    src = build_v2(tmp_path / "record" / "attack_x", cifar, on_disk)
    monkeypatch.chdir(tmp_path / "record")  # the stored relative paths do not resolve here
    out = tmp_path / "out.npz"
    rc, stdout, err = run_main([src, out, "--dataset-dir", cifar], capsys)
    assert rc == 0, err
    assert "50 training images (5 poisoned)" in stdout and f"target {TARGET}" in stdout
    exp = expected(cifar)
    assert_converted(out, exp)
    x, _ = load_cifar10(cifar, True)
    ps = load_poisoned_set(out)
    assert (ps.train_images[POISONED] != x[POISONED]).any(axis=(1, 2, 3)).all()
    clean = np.setdiff1d(np.arange(50), POISONED)
    np.testing.assert_array_equal(ps.train_images[clean], x[clean])


def test_v2_dataset_dir_defaults_to_the_stored_data_path(tmp_path, cifar, capsys):
    """BackdoorBench's rule: data_path's 'data...' part under the folder holding 'record'."""
    shutil.copytree(cifar, tmp_path / "bb" / "data" / "cifar10" / "cifar-10-batches-py")
    src = build_v2(tmp_path / "bb" / "record" / "attack_x", cifar)
    rc, _, err = run_main([src, tmp_path / "out.npz"], capsys)
    assert rc == 0, err
    assert_converted(tmp_path / "out.npz", expected(cifar))


def test_v1_result_converts_exactly(tmp_path, cifar, capsys):
    src = build_v1(tmp_path / "record" / "attack_x", cifar)
    rc, _, err = run_main([src, tmp_path / "out.npz", "--dataset-dir", cifar], capsys)
    assert rc == 0, err
    assert_converted(tmp_path / "out.npz", expected(cifar))


def test_target_class_triggered_images_are_left_out(tmp_path, cifar, capsys):
    x, y = load_cifar10(cifar, False)
    i = int(np.flatnonzero(y == TARGET)[0])

    def add_target_image(r):
        r["bd_test"]["poison_indicator"][i] = 1
        r["bd_test"]["original_index_array"] = np.sort(
            np.append(r["bd_test"]["original_index_array"], i))
        r["bd_test"]["bd_data_container"]["data_dict"][np.int64(i)] = (
            Image.fromarray(trigger(x[i])), TARGET, TARGET)
    src = build_v2(tmp_path / "r", cifar, on_disk=False, edit=add_target_image)
    rc, stdout, err = run_main([src, tmp_path / "o.npz", "--dataset-dir", cifar], capsys)
    assert rc == 0, err
    assert "1 triggered test images of the target class 0 are left out" in stdout
    assert_converted(tmp_path / "o.npz", expected(cifar))


def test_overwrite(tmp_path, cifar, capsys):
    src = build_v2(tmp_path / "r", cifar, on_disk=False)
    out = tmp_path / "o.npz"
    out.write_bytes(b"old")
    rc, _, err = run_main([src, out, "--dataset-dir", cifar], capsys)
    assert rc == 1 and "exists; pass --overwrite" in err and out.read_bytes() == b"old"
    rc, _, err = run_main([src, out, "--dataset-dir", cifar, "--overwrite"], capsys)
    assert rc == 0, err
    assert_converted(out, expected(cifar))


def test_trust_pickle_loads_other_objects(tmp_path, cifar, capsys):
    src = build_v2(tmp_path / "r", cifar, on_disk=False,
                   edit=lambda r: r.update(args=argparse.Namespace(pratio=0.1)))
    rc, _, err = run_main([src, tmp_path / "o.npz", "--dataset-dir", cifar], capsys)
    assert rc == 1 and "--trust-pickle" in err and "argparse.Namespace" in err, err
    rc, _, err = run_main([src, tmp_path / "o.npz", "--dataset-dir", cifar, "--trust-pickle"],
                          capsys)
    assert rc == 0, err


# ------------------------------------------------------------------------------------------
# errors


def _set(path, value):
    def edit(r):
        *head, last = path
        d = r
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _mislabel(r):
    data = r["bd_train"]["bd_data_container"]["data_dict"]
    img, bd, label = data[np.int64(POISONED[0])]
    data[np.int64(POISONED[0])] = (img, bd, (label + 1) % 10)


def _all_to_all(r):
    for k, (img, _, label) in r["bd_test"]["bd_data_container"]["data_dict"].items():
        r["bd_test"]["bd_data_container"]["data_dict"][k] = (img, (label + 1) % 10, label)


def _drop_sample(r):
    del r["bd_train"]["bd_data_container"]["data_dict"][np.int64(POISONED[1])]


ERRORS = {
    "other dataset": (_set(["clean_data"], "gtsrb"), "unsupported dataset 'gtsrb'"),
    "other size": (_set(["img_size"], (64, 64, 3)), "only CIFAR-10 at 32x32"),
    "other format": (_set(["bd_test"], {"images": [1]}),
                     "unsupported format: bd_test is a dict with keys images"),
    "not a result": (lambda r: r.pop("bd_train"), "not a BackdoorBench attack result: key "
                                                  "'bd_train' is missing"),
    "no bd_train": (_set(["bd_train"], None), "holds no poisoned training set"),
    "wrong length": (_set(["bd_train", "poison_indicator"], np.zeros(60)),
                     "does not match: bd_train covers 60 samples"),
    "index out of range": (_set(["bd_test", "original_index_array"], np.array([1, 25])),
                           "does not match: bd_test refers to sample 25"),
    "label mismatch": (_mislabel, "does not match: training sample 3 has true label"),
    "all-to-all": (_all_to_all, "all-to-all attacks are not supported"),
    "missing sample": (_drop_sample, "marks sample 7 as poisoned but the container holds no"),
    "no triggered images": (_set(["bd_test", "original_index_array"], np.array([], int)),
                            "holds no triggered test images"),
    "bad container": (_set(["bd_train", "bd_data_container", "data_dict"],
                           {np.int64(3): "x"}), "unsupported BackdoorBench v2 content"),
}


def assert_one_error_line(rc, err, match):
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_results_are_one_line_errors(tmp_path, cifar, capsys, case):
    edit, match = ERRORS[case]
    src = build_v2(tmp_path / "r", cifar, on_disk=False, edit=edit)
    rc, _, err = run_main([src, tmp_path / "o.npz", "--dataset-dir", cifar], capsys)
    assert_one_error_line(rc, err, match)
    assert not (tmp_path / "o.npz").exists()


def test_file_and_dataset_errors(tmp_path, cifar, capsys):
    out = tmp_path / "o.npz"
    rc, _, err = run_main([tmp_path / "nope.pt", out, "--dataset-dir", cifar], capsys)
    assert_one_error_line(rc, err, "attack result not found")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 50)
    rc, _, err = run_main([junk, out, "--dataset-dir", cifar], capsys)
    assert_one_error_line(rc, err, f"cannot read {junk}")

    torch.save([1, 2], tmp_path / "list.pt")
    rc, _, err = run_main([tmp_path / "list.pt", out, "--dataset-dir", cifar], capsys)
    assert_one_error_line(rc, err, "holds a list, not a dict")

    src = build_v2(tmp_path / "r", cifar)
    rc, _, err = run_main([src, out, "--dataset-dir", tmp_path / "missing"], capsys)
    assert_one_error_line(rc, err, "CIFAR-10 folder not found")

    rc, _, err = run_main([src, out], capsys)  # data_path ./data/cifar10 is not there
    assert_one_error_line(rc, err, "pass --dataset-dir DIR")

    bigger = write_fake_cifar(tmp_path / "bigger", n_train=100, n_test=20, seed=3)
    rc, _, err = run_main([src, out, "--dataset-dir", bigger], capsys)
    assert_one_error_line(rc, err, "does not match: bd_train covers 50 samples, the CIFAR-10 "
                                   "train set has 100")

    shutil.rmtree(tmp_path / "r" / "bd_test_dataset")
    rc, _, err = run_main([src, out, "--dataset-dir", cifar], capsys)
    assert_one_error_line(rc, err, "the image of triggered test sample")
    assert not out.exists()


def test_command_line(tmp_path, cifar):
    """``python -m data.import_backdoorbench``: success, and an error without a traceback."""
    src = build_v2(tmp_path / "r", cifar)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "data.import_backdoorbench", *map(str, args)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    ok = run(src, tmp_path / "o.npz", "--dataset-dir", cifar)
    assert ok.returncode == 0, ok.stderr
    assert_converted(tmp_path / "o.npz", expected(cifar))
    bad = run(src, tmp_path / "o.npz", "--dataset-dir", cifar)
    assert_one_error_line(bad.returncode, bad.stderr, "exists; pass --overwrite")
