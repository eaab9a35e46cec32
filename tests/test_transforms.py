"""Every transform name of docs/original.md §2.5, built from YAML-shaped dicts."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import yaml
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from data.transforms import GaussianBlur, ImageTransform, Normalizer, build_compose
from utils.errors import ConfigError

from .conftest import REPO_ROOT

NORM = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}


def _img(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("name,args,cls", [
    ("random_crop", {"size": 32, "padding": 4}, T.RandomCrop),
    ("random_resize_crop", {"size": 32, "scale": [0.2, 1.0], "interpolation": 3},
     T.RandomResizedCrop),
    ("resize", {"size": 40}, T.Resize),
    ("center_crop", {"size": 28}, T.CenterCrop),
    ("random_horizontal_flip", {"p": 0.5}, T.RandomHorizontalFlip),
    ("random_color_jitter", {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                             "hue": 0.1}, T.RandomApply),
    ("random_grayscale", {"p": 0.2}, T.RandomGrayscale),
    ("gaussian_blur", {"p": 0.5, "sigma": [0.1, 2.0]}, T.RandomApply),
    ("to_tensor", True, T.ToTensor),
    ("normalize", NORM, T.Normalize),
])
def test_each_name_builds_its_transform(name, args, cls):
    cfg = {name: copy.deepcopy(args)}
    op = build_compose(cfg, "t").transforms[0]
    assert isinstance(op, cls)
    assert cfg == {name: args}  # the config is not mutated (docs/differences.md #14)


def test_arguments_reach_the_transform():
    ops = build_compose({
        "random_crop": {"size": 32, "padding": 4, "padding_mode": "reflect"},
        "random_resize_crop": {"size": 32, "scale": [0.2, 1.0], "interpolation": 3},
        "random_color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.3, "saturation": 0.2,
                                "hue": 0.1},
        "gaussian_blur": {"p": 0.5, "sigma": [0.1, 2.0]},
        "random_grayscale": None,  # null entries are skipped
    }, "t").transforms
    assert len(ops) == 4
    assert ops[0].padding == 4 and ops[0].padding_mode == "reflect"
    assert ops[1].interpolation == InterpolationMode.BICUBIC and ops[1].scale == (0.2, 1.0)
    assert ops[2].p == 0.8 and ops[2].transforms[0].contrast == (0.7, 1.3)
    assert ops[3].p == 0.5 and ops[3].transforms[0].sigma == (0.1, 2.0)


def test_unknown_name_and_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="random_rotate"):
        build_compose({"random_rotate": {"degrees": 5}}, "transform.train.primary")
    with pytest.raises(ConfigError, match="random_crop"):
        build_compose({"random_crop": {"sise": 32}}, "transform.train.primary")


def test_gaussian_blur_draws_sigma_from_python_random():
    blur = GaussianBlur((0.1, 2.0))
    from PIL import Image, ImageFilter
    img = Image.fromarray(_img())
    random.seed(5)
    out = np.asarray(blur(img))
    random.seed(5)
    radius = random.uniform(0.1, 2.0)
    assert np.array_equal(out, np.asarray(img.filter(ImageFilter.GaussianBlur(radius))))


def test_device_normalisation_equals_to_tensor_normalize():
    section = {"primary": None, "remaining": {"to_tensor": True, "normalize": NORM}}
    tf = ImageTransform(section, "transform.test")
    assert tf.mean is not None
    img = _img()
    x = tf(img)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    norm = Normalizer(tf.mean, tf.std, torch.device("cpu"))
    ours = norm(x[None])[0]
    ref = T.Normalize(**NORM)(T.ToTensor()(img))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_other_remaining_is_applied_per_image():
    section = {"primary": None, "remaining": {"to_tensor": True}}
    tf = ImageTransform(section, "t")
    assert tf.mean is None
    x = tf(_img())
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0


def test_original_configs_load_and_build():
    paths = [p for p in sorted((REPO_ROOT / "config").rglob("example.yaml"))
             if p.parent.parent.name in ("badnets", "blend")
             and p.parent.name == "cifar10_resnet18"]
    assert len(paths) == 6  # the original's six configs
    for p in paths:
        cfg = yaml.safe_load(p.read_text())
        before = copy.deepcopy(cfg)
        for part in ("train", "test", "aug"):
            if part in cfg["transform"]:
                tf = ImageTransform(cfg["transform"][part], part, pre=cfg["transform"]["pre"])
                out = tf(_img())
                assert out.shape == (3, 32, 32)
        assert cfg == before


# --------------------------------------------------------------------------- the one schema

def test_both_paths_implement_exactly_the_schema_ops():
    from data import augment_schema, fast_aug, transforms
    assert set(transforms._TORCHVISION) == set(augment_schema.OPS)
    assert set(fast_aug._OPS) == set(augment_schema.OPS)


@pytest.mark.parametrize("name,cls", [
    ("random_crop", T.RandomCrop), ("center_crop", T.CenterCrop),
    ("random_horizontal_flip", T.RandomHorizontalFlip),
    ("random_resize_crop", T.RandomResizedCrop), ("resize", T.Resize),
    ("random_color_jitter", T.ColorJitter), ("random_grayscale", T.RandomGrayscale),
    ("gaussian_blur", GaussianBlur), ("to_tensor", T.ToTensor), ("normalize", T.Normalize),
])
def test_schema_arguments_and_defaults_are_torchvisions(name, cls):
    """The PIL path passes the arguments as written to torchvision, the batched path takes the
    schema's defaults for the others: both must agree with torchvision."""
    import inspect

    from data.augment_schema import OPS
    defaults = dict(OPS[name].defaults)
    if name in ("random_color_jitter", "gaussian_blur"):
        assert defaults.pop("p") == 1.0  # RandomApply's p, 1 unless the config says
    params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items()
              if k not in ("self", "where")}
    assert set(params) == set(defaults)
    for k, p in params.items():
        if p.default is inspect.Parameter.empty:
            assert defaults[k] is None  # required: checked as missing
        elif isinstance(p.default, InterpolationMode):
            assert defaults[k] == p.default.value
        else:
            assert defaults[k] == p.default


def test_one_interpolation_map():
    from PIL import Image

    from data.augment_schema import INTERPOLATION_NAMES, PIL_FILTER_CODES
    assert set(INTERPOLATION_NAMES) == {m.value for m in InterpolationMode}
    for code, name in PIL_FILTER_CODES.items():
        assert Image.Resampling(code).name.lower() == name
    ops = build_compose({"resize": {"size": 8, "interpolation": "Hamming"},
                         "random_resize_crop": {"size": 8, "interpolation": 1}}, "t").transforms
    assert ops[0].interpolation == InterpolationMode.HAMMING
    assert ops[1].interpolation == InterpolationMode.LANCZOS


@pytest.mark.parametrize("entry,message", [
    ({"random_grayscale": {"p": 2}}, r"t\.random_grayscale\.p must be a probability"),
    ({"gaussian_blur": {"sigma": [2, 1]}}, r"t\.gaussian_blur\.sigma must be \[min, max\]"),
    ({"random_color_jitter": {"hue": 0.7}}, r"t\.random_color_jitter\.hue: values must lie"),
    ({"resize": {"size": 8, "interpolation": 9}}, "unknown PIL filter code 9"),
    ({"resize": {"size": 8, "interpolation": "cubic"}}, "unknown mode 'cubic'"),
    ({"random_crop": {"sise": 32}}, r"t\.random_crop: bad arguments \(unexpected argument"),
    ({"to_tensor": False}, "to_tensor must be true when present"),
])
def test_both_paths_reject_bad_arguments_with_the_same_line(entry, message):
    from data.fast_aug import BatchTransform
    with pytest.raises(ConfigError, match=message) as pil:
        build_compose(entry, "t")
    remaining = {"to_tensor": True}
    section = {"remaining": entry} if "to_tensor" in entry else {"primary": entry,
                                                                  "remaining": remaining}
    where = "t" if "to_tensor" not in entry else "x"
    with pytest.raises(ConfigError) as batched:
        BatchTransform(section, where)
    part = "primary" if "to_tensor" not in entry else "remaining"
    assert str(batched.value) == str(pil.value).replace("t.", f"{where}.{part}.", 1)
    assert "\n" not in str(pil.value)


def test_gaussian_blur_parameters_come_from_the_schema():
    from data import augment_schema
    from data.fast_aug import GaussianBlur as BatchedBlur
    assert GaussianBlur().sigma == augment_schema.OPS["gaussian_blur"].defaults["sigma"]
    assert BatchedBlur("t").sigma == GaussianBlur().sigma and BatchedBlur("t").p == 1.0
    with pytest.raises(ConfigError, match="sigma must be"):
        GaussianBlur((2.0, 1.0))
