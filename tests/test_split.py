"""The loss split's rules (mixmatch_finetune.split_by_loss, docs/differences.md #6): the
original's global cut, the per-class cut, the global cut with a class floor, and the
oracle diagnostic that never labels a poisoned sample."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from mixmatch_finetune import hold_out, split_by_loss
from utils.errors import ConfigError
from utils.schema import Semi, section


def _swollen_target(seed: int = 0):
    """Three given labels of 100 clean samples (losses uniform in [0, 1]); label 0 also holds
    100 relabelled samples with higher losses (uniform in [0.5, 1.5]), as a poisoned target
    class does under the warm-up model. Label 2's samples are hard: losses in [1, 2]."""
    rng = np.random.default_rng(seed)
    losses = np.concatenate([rng.uniform(0, 1, 100), rng.uniform(0.5, 1.5, 100),
                             rng.uniform(0, 1, 100), rng.uniform(1, 2, 100)])
    targets = np.repeat([0, 0, 1, 2], 100)
    poisoned = np.repeat([False, True, False, False], 100)
    return losses, targets, poisoned


def test_a_zero_floor_is_the_global_split():
    losses, targets, _ = _swollen_target()
    glob = split_by_loss(losses, 0.5)
    assert np.array_equal(split_by_loss(losses, 0.5, targets, class_floor=0.0), glob)
    assert glob.sum() == 200 and losses[glob == 1].max() < losses[glob == 0].min()
    assert glob[targets == 2].sum() == 0  # the hard label is starved by the global cut


@pytest.mark.parametrize("floor", [0.25, 0.5, 0.75, 1.0])
def test_every_label_keeps_its_floor_and_the_rest_goes_by_the_global_ranking(floor):
    losses, targets, _ = _swollen_target()
    semi = split_by_loss(losses, 0.5, targets, class_floor=floor)
    assert semi.sum() == 200  # as many labelled as the global split
    share = int(floor * 200 / 3)
    for c in range(3):
        m = targets == c
        assert semi[m].sum() >= share
        # within a label, the kept ones are its lowest-loss members
        assert losses[m & (semi == 1)].max() < losses[m & (semi == 0)].min()
    # above the floors, the global ranking: take away each label's `share` lowest-loss
    # members; every other kept sample has a lower loss than every sample left out
    floor_members = np.zeros(len(losses), bool)
    for c in range(3):
        members = np.flatnonzero(targets == c)
        floor_members[members[np.argsort(losses[members], kind="stable")[:share]]] = True
    assert floor_members[semi == 0].sum() == 0
    filled = (semi == 1) & ~floor_members
    assert filled.sum() == 200 - 3 * share
    if filled.any():
        assert losses[filled].max() <= losses[semi == 0].min()


def test_a_full_floor_cuts_a_swollen_target_label_to_an_equal_share():
    """The per-class split gives the swollen label half of its 200 members, so relabelled
    samples pass its cut; the full floor gives every label the same 66, fewer of them."""
    losses, targets, poisoned = _swollen_target()
    per = split_by_loss(losses, 0.5, targets, per_class=True)
    full = split_by_loss(losses, 0.5, targets, class_floor=1.0)
    assert per[targets == 0].sum() == 100
    # 66 each, and the 2 left over by the global ranking: the two lowest losses outside the
    # floors (label 2's are all above label 0's and 1's)
    assert full.sum() == 200
    beyond = [np.sort(losses[targets == c])[66:] for c in range(3)]
    second = np.sort(np.concatenate(beyond))[1]
    assert full[targets == 0].sum() == 66 + (beyond[0] <= second).sum()
    assert (full.astype(bool) & poisoned).sum() < (per.astype(bool) & poisoned).sum()
    assert full[targets == 2].sum() == 66  # the hard label is fed


def test_a_label_smaller_than_its_floor_is_kept_whole():
    losses = np.arange(10, dtype=float)
    targets = np.array([0] * 8 + [1] * 2)  # label 1: 2 samples, floor int(1.0 * 5 / 2) = 2
    semi = split_by_loss(losses, 0.5, targets, class_floor=1.0)
    assert semi.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1]


def test_the_split_reads_losses_and_given_labels_only():
    """No argument carries which samples are poisoned."""
    params = list(inspect.signature(split_by_loss).parameters)
    assert params == ["losses", "epsilon", "targets", "per_class", "class_floor"]


def test_the_schema_declares_the_floor_and_refuses_two_splits():
    base = {"epsilon": 0.5, "loader": {"batch_size": 8}, "criterion": {"mixmatch": {}},
            "mixmatch": {"train_iteration": 1, "temperature": 0.5, "alpha": 0.75},
            "num_epochs": 1}
    assert section({"semi": base}, Semi, "semi").split == "global (the original's)"
    assert section({"semi": {**base, "class_floor": 0.5}}, Semi, "semi").split == (
        "global with a class floor of 0.5 (semi.class_floor)")
    with pytest.raises(ConfigError, match="two different splits"):
        section({"semi": {**base, "class_floor": 0.5, "per_class": True}}, Semi, "semi")
    with pytest.raises(ConfigError, match="class_floor"):
        section({"semi": {**base, "class_floor": 1.5}}, Semi, "semi")


@pytest.mark.parametrize("rule", [{}, {"class_floor": 1.0}, {"per_class": True}])
def test_held_out_samples_are_labelled_only_after_every_other(rule):
    """hold_out ranks the held samples last: with enough clean samples none is labelled, and
    the clean samples are chosen exactly as the same rule chooses among them alone."""
    losses, targets, poisoned = _swollen_target()
    losses[poisoned] -= 0.5  # the poisoned samples now look easy: the plain rule labels some
    assert (split_by_loss(losses, 0.5, targets, **rule)[poisoned] == 1).any()
    semi = split_by_loss(hold_out(losses, poisoned.astype(int)), 0.5, targets, **rule)
    assert not (semi[poisoned] == 1).any()
    if not rule:  # the global count is kept, taken from the clean samples' lowest losses
        clean = np.flatnonzero(~poisoned)
        kept = clean[np.argsort(losses[clean], kind="stable")[:200]]
        assert sorted(np.flatnonzero(semi == 1)) == sorted(kept)


def test_hold_out_leaves_the_other_losses_alone():
    losses = np.array([0.3, 2.0, 0.1, 5.0], dtype=np.float32)
    out = hold_out(losses, np.array([0, 1, 0, 0]))
    assert out.tolist() == [pytest.approx(0.3), np.inf, pytest.approx(0.1), 5.0]
    assert losses.tolist()[1] == 2.0  # not in place


def test_the_schema_names_the_oracle_split():
    base = {"epsilon": 0.5, "loader": {"batch_size": 8}, "criterion": {"mixmatch": {}},
            "mixmatch": {"train_iteration": 1, "temperature": 0.5, "alpha": 0.75},
            "num_epochs": 1}
    assert not section({"semi": base}, Semi, "semi").oracle_split
    split = section({"semi": {**base, "class_floor": 1, "oracle_split": True}}, Semi,
                    "semi").split
    assert split.startswith("global with a class floor of 1 (semi.class_floor), the poisoned")
    assert "semi.oracle_split" in split
