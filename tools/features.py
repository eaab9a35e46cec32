"""How the poisoned training images sit among the others in a model's features: a 2-D PCA
map of the penultimate features, No Defense's against SimCLR's, and the share of poisoned
samples among each poisoned sample's nearest neighbours (dbd.py's report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.attacks import build_attack
from data.build import build_poison_train, load_split, transform_for
from data.transforms import Normalizer
from model import SelfModel, build_backbone, build_linear_model
from utils.checkpoint import load_checkpoint, load_model_state
from utils.paths import REPO_ROOT


@torch.no_grad()
def feature_maps(sup_cfg: dict, sup_saved: Path, nd_ckpt: Path, pre_cfg: dict, pre_ckpt: Path,
                 device, per_class: int = 150,
                 max_poison: int = 300) -> dict:
    """2-D PCA of penultimate features of training images: No Defense vs SimCLR."""
    images, targets = load_split(sup_cfg, train=True)
    poison_idx = np.load(sup_saved / "poison_idx.npy")
    tf = transform_for(sup_cfg, "test")
    ds = build_poison_train(sup_cfg, poison_idx, images, targets, tf,
                            build_attack(sup_cfg["backdoor"], REPO_ROOT))
    rng = np.random.RandomState(0)
    pois = np.flatnonzero(poison_idx == 1)
    sel = [rng.choice(pois, min(max_poison, len(pois)), replace=False)] if len(pois) else []
    for c in np.unique(targets):
        members = np.flatnonzero((targets == c) & (poison_idx == 0))
        sel.append(rng.choice(members, min(per_class, len(members)), replace=False))
    sel = np.concatenate(sel)
    x = torch.from_numpy(ds.data[sel]).permute(0, 3, 1, 2)
    x = Normalizer(tf.mean, tf.std, device)(x)

    nd = build_linear_model(sup_cfg)
    load_model_state(nd, load_checkpoint(nd_ckpt)["model_state_dict"], nd_ckpt)
    bb = build_backbone(pre_cfg["network"])
    sm = SelfModel(bb, bb.feature_dim, 128)
    load_model_state(sm, load_checkpoint(pre_ckpt)["model_state_dict"], pre_ckpt)
    poison = ds.poison_idx[sel] == 1
    out = {"maps": {}, "poisoned_neighbours": {}, "poisoned_share": float(poison.mean())}
    for title, backbone in (("No Defense (supervised on poisoned labels)", nd.backbone),
                            ("DBD stage 1 (SimCLR, no labels)", sm.backbone)):
        backbone = backbone.to(device).eval()
        f = torch.cat([backbone(chunk) for chunk in x.split(256)]).float()
        f = f - f.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(f, q=2, center=False)
        out["maps"][title] = ((f @ v[:, :2]).cpu().numpy(), ds.origin[sel], poison)
        out["poisoned_neighbours"][title] = poisoned_neighbour_share(f.cpu(), poison)
    return out


def poisoned_neighbour_share(features: torch.Tensor, poison: np.ndarray, k: int = 10) -> float:
    """Mean share of poisoned samples among the ``k`` nearest neighbours (Euclidean, the full
    feature space, the sample itself excluded) of each poisoned sample: near 1 when the poisoned
    samples form a cluster of their own, near their overall share when they mix with the rest."""
    if poison.sum() == 0 or len(poison) <= k:
        return float("nan")
    d = torch.cdist(features[torch.from_numpy(poison)], features)
    d[torch.arange(d.shape[0]), torch.from_numpy(np.flatnonzero(poison))] = float("inf")
    nearest = d.topk(k, largest=False).indices
    return float(torch.from_numpy(poison)[nearest].float().mean())


