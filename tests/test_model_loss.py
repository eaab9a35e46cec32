"""Model shape, parameter count and state-dict keys; SCE/RCE against the formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from loss import SCELoss, build_criterion
from model import LinearModel, SelfModel, build_backbone, build_linear_model, resnet18_cifar
from utils.errors import ConfigError


def test_resnet18_cifar_parameter_count_and_keys():
    model = build_linear_model({"network": {"resnet18_cifar": {"num_classes": 10}}})
    n = sum(p.numel() for p in model.parameters())
    assert n == 11_173_962  # ~11.17 M, docs/original.md §3.1
    keys = model.state_dict().keys()
    for k in ("backbone.conv1.weight", "backbone.bn1.running_mean",
              "backbone.layer1.0.conv1.weight", "backbone.layer2.0.shortcut.0.weight",
              "backbone.layer2.0.shortcut.1.running_var", "backbone.layer4.1.bn2.weight",
              "linear.weight", "linear.bias"):
        assert k in keys
    assert "backbone.layer1.0.shortcut.0.weight" not in keys  # identity shortcut in stage 1
    assert not any(k.startswith("backbone.fc") or "maxpool" in k for k in keys)


def test_forward_shapes_and_width():
    x = torch.randn(2, 3, 32, 32)
    bb = resnet18_cifar(width=16)
    assert bb(x).shape == (2, 128) and bb.feature_dim == 128
    lm = LinearModel(bb, bb.feature_dim, 10)
    assert lm(x).shape == (2, 10)
    sm = SelfModel(resnet18_cifar(), 512, 128)
    z = sm(x)
    assert z.shape == (2, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    keys = sm.state_dict().keys()
    assert {"proj_head.0.weight", "proj_head.1.running_mean", "proj_head.3.bias"} <= set(keys)
    assert not any(k.startswith("proj_head.2") for k in keys)


def test_network_config_errors():
    with pytest.raises(ConfigError, match="resnet50"):
        build_backbone({"resnet50": {}})
    with pytest.raises(ConfigError, match="depth"):
        build_backbone({"resnet18_cifar": {"depth": 3}})


def _sce_by_formula(logits, targets, alpha, beta, num_classes):
    out = []
    for row, y in zip(logits.tolist(), targets.tolist()):
        m = max(row)
        exps = [math.exp(v - m) for v in row]
        s = sum(exps)
        p = [e / s for e in exps]
        ce = -math.log(p[y])
        rce = 0.0
        for k in range(num_classes):
            pk = min(max(p[k], 1e-7), 1.0)
            onehot = 1.0 if k == y else 1e-4
            rce += -pk * math.log(onehot)
        out.append(alpha * ce + beta * rce)
    return torch.tensor(out)


def test_sce_against_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g) * 3
    logits[0] = torch.tensor([30.0] + [0.0] * 9)  # p clamps at 1e-7 for the others
    targets = torch.randint(0, 10, (16,), generator=g)
    crit = SCELoss(alpha=0.1, beta=1.0, num_classes=10, reduction="none")
    expected = _sce_by_formula(logits, targets, 0.1, 1.0, 10)
    torch.testing.assert_close(crit(logits, targets), expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crit(logits, targets, reduction="mean"), expected.float().mean(),
                               rtol=1e-5, atol=1e-6)
    assert crit.reduction == "none"  # a per-call reduction leaves the loss as built
    mean_crit = SCELoss(alpha=0.1, beta=1.0, num_classes=10)
    per_sample = mean_crit(logits, targets, reduction="none")
    assert torch.equal(per_sample, crit(logits, targets))
    # the per-call reductions are the same operations as the built ones, to the last bit
    assert torch.equal(mean_crit(logits, targets), per_sample.mean())
    assert torch.equal(mean_crit(logits, targets, reduction="sum"), per_sample.sum())
    # RCE of a confident wrong prediction approaches -log(1e-4)
    wrong = SCELoss(0.0, 1.0, 10, "none")(torch.tensor([[0.0, 50.0] + [0.0] * 8]),
                                         torch.tensor([0]))
    assert abs(float(wrong) - (-math.log(1e-4))) < 1e-3


def test_build_criterion():
    assert isinstance(build_criterion({"sce": {"alpha": 0.1, "beta": 1, "num_classes": 10}}),
                      SCELoss)
    ce = build_criterion({"cross_entropy": {"reduction": "mean"}})
    assert isinstance(ce, torch.nn.CrossEntropyLoss)
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    for reduction in ("none", "sum", "mean"):
        assert torch.equal(ce(logits, targets, reduction=reduction),
                           F.cross_entropy(logits, targets, reduction=reduction))
    assert ce.reduction == "mean"
    with pytest.raises(ConfigError, match="focal"):
        build_criterion({"focal": {}})
