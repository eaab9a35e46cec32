"""SimCLR and MixMatch losses, sharpening, mixup, interleave, the split, the warm-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loss import MixMatchLoss, SCELoss, SimCLRLoss
from loss.mixmatch import interleave, mixup, sharpen
from mixmatch_finetune import split_by_loss, split_quality
from model import LinearModel, resnet18_cifar
from utils.speed import Speed


def _naive_nt_xent(z1, z2, tau, symmetric):
    b = len(z1)
    cands = torch.cat([z1, z2])
    anchors = range(2 * b) if symmetric else range(b)
    total = []
    for i in anchors:
        a = cands[i]
        pos = (i + b) % (2 * b)
        num = math.exp(float(a @ cands[pos]) / tau)
        den = sum(math.exp(float(a @ cands[j]) / tau) for j in range(2 * b) if j != i)
        total.append(-math.log(num / den))
    return torch.tensor(total)


@pytest.mark.parametrize("symmetric", [False, True])
def test_simclr_loss_against_naive_formula(symmetric):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 2, 16, generator=g), dim=2)
    crit = SimCLRLoss(0.5, symmetric=symmetric, reduction="none")
    expected = _naive_nt_xent(z[:, 0], z[:, 1], 0.5, symmetric)
    torch.testing.assert_close(crit(z), expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crit(z, reduction="mean"), expected.float().mean(), rtol=1e-5,
                               atol=1e-5)
    assert crit.reduction == "none"  # a per-call reduction leaves the loss as built
    torch.testing.assert_close(SimCLRLoss(0.5, symmetric=symmetric)(z, reduction="none"),
                               expected.float(), rtol=1e-5, atol=1e-5)


def test_simclr_one_directional_differs_from_symmetric():
    z = F.normalize(torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(1)), dim=2)
    assert not torch.isclose(SimCLRLoss(0.5)(z), SimCLRLoss(0.5, symmetric=True)(z))


def test_simclr_identical_views_analytic():
    """Orthogonal images, identical views: every logit is 0 except the positive (1/τ)."""
    b, tau = 4, 0.5
    z = torch.eye(8)[:b]
    feats = torch.stack([z, z], dim=1)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * b - 2))
    assert float(SimCLRLoss(tau)(feats)) == pytest.approx(expected, rel=1e-6)
    # all embeddings equal: every candidate is as similar as the positive, -log(1/(2b-1))
    same = torch.ones(b, 2, 3) / math.sqrt(3)
    assert float(SimCLRLoss(tau)(same)) == pytest.approx(-math.log(1 / (2 * b - 1)), rel=1e-6)


def test_mixmatch_loss_terms():
    g = torch.Generator().manual_seed(0)
    xl, ul = torch.randn(4, 10, generator=g), torch.randn(8, 10, generator=g)
    xt = torch.softmax(torch.randn(4, 10, generator=g), 1)
    ut = torch.softmax(torch.randn(8, 10, generator=g), 1)
    crit = MixMatchLoss(lambda_u=15, rampup_length=190)
    loss, lx, lu, lam = crit(xl, xt, ul, ut, t=19.0)
    exp_lx = float(-(torch.log_softmax(xl, 1) * xt).sum(1).mean())
    exp_lu = float(((torch.softmax(ul, 1) - ut) ** 2).sum() / (8 * 10))
    assert float(lx) == pytest.approx(exp_lx, rel=1e-5)
    assert float(lu) == pytest.approx(exp_lu, rel=1e-5)
    assert lam == pytest.approx(15 * 19 / 190)
    assert float(loss) == pytest.approx(exp_lx + lam * exp_lu, rel=1e-5)


def test_lambda_u_schedule_fresh_and_resumed():
    crit = MixMatchLoss(15, 190)
    # first MixMatch epoch (displayed 11, index 10): 0.789 -> 0.868 (docs/original.md §5.4)
    assert crit.weight(10.0) == pytest.approx(0.7894737, rel=1e-6)
    assert crit.weight(10 + 1023 / 1024) == pytest.approx(0.868, abs=1e-3)
    assert crit.weight(190.0) == 15 and crit.weight(199.5) == 15
    assert MixMatchLoss(15, 0).weight(0.0) == 15


def test_sharpen():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    out = sharpen(p, 0.5)
    expected = p ** 2 / (p ** 2).sum(1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    assert out[0, 0] > p[0, 0]


def test_mixup_keeps_lambda_at_least_half():
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.randn(12, 3)
    y = torch.eye(12)[:, :4]
    for _ in range(200):
        mx, my, lam = mixup(x, y, 0.75)
        assert lam >= 0.5
    # each mixed row is lam * itself + (1 - lam) * one other row, the same for x and y
    np.random.seed(1)
    torch.manual_seed(1)
    mx, my, lam = mixup(x, y, 0.75)
    torch.manual_seed(1)
    perm = torch.randperm(12)
    torch.testing.assert_close(mx, lam * x + (1 - lam) * x[perm])
    torch.testing.assert_close(my, lam * y + (1 - lam) * y[perm])


def test_interleave_is_undone_exactly_and_mixes_batches():
    b = 64
    chunks = [torch.full((b, 2), float(k)) + torch.arange(b)[:, None] / 100 for k in range(3)]
    mixed = interleave(chunks, b)
    assert all(len(c) == b for c in mixed)
    # groups of 21, 21, 22: chunk 0 holds 21 of its own, 21 from chunk 1, 22 from chunk 2
    assert (mixed[0][:, 0].floor() == 0).sum() == 21
    assert (mixed[0][:, 0].floor() == 1).sum() == 21
    assert (mixed[0][:, 0].floor() == 2).sum() == 22
    back = interleave(mixed, b)
    for a, c in zip(back, chunks):
        assert torch.equal(a, c)


def test_split_picks_exactly_the_lowest_loss_fraction():
    rng = np.random.default_rng(0)
    losses = rng.random(1001)
    semi = split_by_loss(losses, 0.5)
    assert semi.sum() == 500
    assert losses[semi == 1].max() < losses[semi == 0].min()
    targets = np.arange(1001) % 3
    per = split_by_loss(losses, 0.5, targets, per_class=True)
    for c in range(3):
        m = targets == c
        assert per[m].sum() == int(m.sum() * 0.5)
        assert losses[m & (per == 1)].max() < losses[m & (per == 0)].min()
    q = split_quality(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    assert q == {"labelled": 2, "unlabelled": 2, "poisoned_labelled": 1, "poisoned_total": 2,
                 "precision": 0.5, "recall": 0.5}


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_warmup_changes_only_the_linear_layer(freeze_bn):
    from data.transforms import Normalizer
    from utils.loops import warmup_epoch

    torch.manual_seed(0)
    model = LinearModel(resnet18_cifar(width=8), 64, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {k: v.clone() for k, v in model.backbone.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    batches = [{"img": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
                "target": torch.randint(0, 10, (8,)), "poison": torch.zeros(8, dtype=torch.long)}
               for _ in range(3)]
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    warmup_epoch(model, batches, SCELoss(), opt, norm, Speed({}, torch.device("cpu")),
                 freeze_bn, True, "w")
    for k, v in model.backbone.named_parameters():
        assert torch.equal(v, params_before[k]), k
        assert v.grad is None
    after = model.state_dict()
    assert not torch.equal(after["linear.weight"], before["linear.weight"])
    bn_moved = not torch.equal(after["backbone.bn1.running_mean"],
                               before["backbone.bn1.running_mean"])
    assert bn_moved != freeze_bn  # BN statistics drift as the original unless frozen
