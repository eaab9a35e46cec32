"""Shared fixtures: a tiny synthetic CIFAR-format folder, and the real copy when available."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_fake_cifar(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0,
                     noise: float = 40, colours: np.ndarray | None = None) -> Path:
    """Write ``root/cifar-10-batches-py`` with learnable class-coloured noise images: one
    colour per class (``colours``, [10, 3] RGB, or drawn at random), plus Gaussian noise of
    standard deviation ``noise`` per pixel."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    if colours is None:
        base = rng.integers(0, 256, size=(10, 3, 1, 1))  # one colour per class, train and test
    else:
        base = np.asarray(colours, dtype=np.float64).reshape(10, 3, 1, 1)

    def batch(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        imgs = np.clip(base[labels] + rng.normal(0, noise, size=(n, 3, 32, 32)), 0, 255)
        return {"data": imgs.astype(np.uint8).reshape(n, 3072), "labels": labels.tolist()}

    per = n_train // 5
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per), f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    return d


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def real_cifar() -> Path:
    d = os.environ.get("DBD_CIFAR_DIR")
    if not d or not (Path(d) / "data_batch_1").is_file():
        pytest.skip("real CIFAR-10 not available: set DBD_CIFAR_DIR to a "
                    "cifar-10-batches-py folder")
    return Path(d)


def original_trigger_dir() -> Path | None:
    """The authors' trigger images (``cifar_1.png``, ``hello_kitty.png``), third-party files this
    repository does not ship: the folder named by ``DBD_TRIGGER_DIR``, when it exists."""
    d = os.environ.get("DBD_TRIGGER_DIR")
    return Path(d) if d and Path(d).is_dir() else None


@pytest.fixture(scope="session")
def original_triggers() -> Path:
    d = original_trigger_dir()
    if d is None:
        pytest.skip("the original trigger images are not available: set DBD_TRIGGER_DIR to a "
                    "folder holding cifar_1.png and hello_kitty.png")
    return d


def count_predictions(cfg_path: Path, ckpt_path: Path) -> dict[str, int]:
    """The predictions of the model in a training checkpoint on the test set of a CIFAR-format
    config, counted by hand: the test batch read with pickle, the trigger stamped with numpy
    (BadNets; another attack's own ``apply`` otherwise), the test normalisation in plain torch,
    none of the project's loaders or metrics. Returns ``clean_correct`` of ``clean_total``
    test images, and of the ``triggered_total`` non-target images those predicted as the
    target without the trigger (``clean_to_target``) and with it (``to_target``: ASR's
    numerator), and those predicted as their true class with it (``to_origin``: RA's)."""
    import pickle

    import torch
    import yaml
    from PIL import Image

    from model import build_linear_model

    cfg = yaml.safe_load(Path(cfg_path).read_text())
    tf = cfg["transform"]
    assert cfg.get("test_subset") is None and tf.get("pre") is None
    assert not tf["test"].get("primary"), "count_predictions knows normalisation only"
    with open(Path(cfg["dataset_dir"]).expanduser() / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch["labels"])
    target = cfg["backdoor"]["target_label"]
    keep = labels != target
    if "badnets" in cfg["backdoor"]:
        path = Path(cfg["backdoor"]["badnets"]["trigger_path"])
        with Image.open(path if path.is_absolute() else REPO_ROOT / path) as im:
            trigger = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
        triggered = np.where(trigger != 0, trigger, images[keep])
    else:
        from data.build import backdoor_for
        nhwc = np.ascontiguousarray(images[keep].transpose(0, 2, 3, 1))
        triggered = backdoor_for(cfg)(nhwc).transpose(0, 3, 1, 2)

    model = build_linear_model(cfg)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model_state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    norm = tf["test"]["remaining"]["normalize"]
    mean = torch.tensor(norm["mean"]).view(-1, 1, 1)
    std = torch.tensor(norm["std"]).view(-1, 1, 1)

    def predict(x):
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(x)).float() / 255
            return model((x - mean) / std).argmax(1).numpy()

    clean, trig = predict(images), predict(triggered)
    return {"clean_total": len(labels), "clean_correct": int((clean == labels).sum()),
            "clean_to_target": int((clean[keep] == target).sum()),
            "triggered_total": int(keep.sum()), "to_target": int((trig == target).sum()),
            "to_origin": int((trig == labels[keep]).sum())}


def assert_metrics_match(metrics: dict, counts: dict[str, int]) -> None:
    """BA, ASR and RA as a stage or test.py wrote them equal the hand counts' fractions."""
    n, m = counts["clean_total"], counts["triggered_total"]
    assert metrics["BA"] == pytest.approx(counts["clean_correct"] / n, abs=1e-9)
    assert metrics["ASR"] == pytest.approx(counts["to_target"] / m, abs=1e-9)
    assert metrics["RA"] == pytest.approx(counts["to_origin"] / m, abs=1e-9)


TINY_LOADER = {"batch_size": 32, "num_workers": 0, "pin_memory": False}
SCRIPTS = {"supervise": "supervise.py", "simclr": "simclr.py", "finetune": "mixmatch_finetune.py"}


def tiny_stage_configs(root: Path, dataset_dir: Path, epochs: int, common: dict | None = None,
                       edit=None, pretrained_from: Path | None = None) -> dict:
    """Write tiny supervise / SimCLR / fine-tuning configs (width 8, 20 % poisoning) under
    ``root/config/<stage>/t.yaml``; runs write to ``root/saved`` and ``root/storage``.

    Each stage trains ``epochs`` epochs (fine-tuning: half warm-up, half MixMatch);
    ``common`` is merged into every config, ``edit(sup, pre, ft)`` changes them further, and
    ``pretrained_from`` points fine-tuning at another SimCLR config.
    """
    import yaml

    def load(rel):
        return yaml.safe_load((REPO_ROOT / rel).read_text())
    folders = dict(saved_dir=str(root / "saved"), storage_dir=str(root / "storage"))
    common = dict(common or {})
    sup = load("config/supervise/badnets/cifar10_resnet18/example.yaml") | common | folders
    sup.update(dataset_dir=str(dataset_dir), num_epochs=epochs, loader=TINY_LOADER,
               lr_scheduler={"multi_step": {"milestones": [epochs // 2]}})
    pre = load("config/defense/simclr/badnets/cifar10_resnet18/example.yaml") | common | folders
    pre.update(dataset_dir=str(dataset_dir), num_epochs=epochs,
               loader=dict(TINY_LOADER, batch_size=64),
               simclr={"num_stage_epochs": epochs, "min_interval": max(epochs // 2, 1),
                       "max_interval": max(epochs // 2, 1)})
    ft = load("config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml")
    ft.update({k: v for k, v in common.items() if k != "seed"}, **folders)
    ft["warmup"].update(loader=TINY_LOADER, num_epochs=epochs // 2)
    ft["semi"].update(loader=dict(TINY_LOADER, batch_size=16), num_epochs=epochs - epochs // 2)
    for c in (sup, pre, ft):
        c["network"]["resnet18_cifar"]["width"] = 8
    for c in (sup, pre):
        c["backdoor"]["poison_ratio"] = 0.2
    if edit is not None:
        edit(sup, pre, ft)
    paths = {}
    for name, c in (("supervise", sup), ("simclr", pre), ("finetune", ft)):
        if name == "finetune":
            c["pretrain_config_path"] = str(pretrained_from or paths["simclr"])
            c["pretrain_checkpoint"] = f"epoch{epochs}.pt"
        p = root / "config" / name / "t.yaml"
        p.parent.mkdir(parents=True)
        p.write_text(yaml.safe_dump(c, sort_keys=False))
        paths[name] = p
    return paths


def write_fake_imagefolder(root: Path, classes=("cat", "airplane", "dog"), per_class: int = 2,
                           size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """``root/train/<class>/*`` and ``root/val/<class>/*``: small class-coloured noise images,
    PNG and JPEG alternately (``size`` is height, width)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            colour = (np.array([37, 91, 173]) * (c + 1)) % 256
            for i in range(per_class):
                img = np.clip(colour + rng.normal(0, 30, size=(*size, 3)), 0, 255)
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(img.astype(np.uint8)).save(d / f"img{i}.{ext}")
    return root
