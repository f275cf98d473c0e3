"""LDS machinery on synthetic data where the truth is known exactly."""
import json

import numpy as np
import pytest
import torch

from grass_index.eval import as_masks, group_scores, lds, load_ground_truth, make_subsets, train_ground_truth


def _linear_world(n_train=60, n_query=8, m=40, seed=0):
    """Losses exactly linear in subset membership: loss_m(z) = c(z) - Σ_{i∈S_m} w(z, z_i)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_query, n_train))
    masks = make_subsets(n_train, m, 0.5, seed)
    losses = 3.0 - masks.astype(float) @ w.T
    return w, masks, losses


# -- subsets ----------------------------------------------------------------------------

def test_make_subsets_sizes_and_seeding():
    a = make_subsets(101, 20, 0.3, seed=5)
    assert a.shape == (20, 101) and a.dtype == bool
    assert (a.sum(1) == round(0.3 * 101)).all()
    assert np.array_equal(a, make_subsets(101, 20, 0.3, seed=5))
    assert not np.array_equal(a, make_subsets(101, 20, 0.3, seed=6))
    assert len({r.tobytes() for r in a}) == 20  # distinct subsets


@pytest.mark.parametrize("args,word", [((1, 10, 0.5), "n="), ((10, 2, 0.5), "m="),
                                        ((10, 10, 1.0), "alpha"), ((10, 10, 0.01), "alpha")])
def test_make_subsets_bad_input(args, word):
    with pytest.raises(ValueError, match=word):
        make_subsets(*args)


def test_as_masks_accepts_index_lists():
    m = as_masks([[0, 2], [1], [3, 0]], n=4)
    assert m.tolist() == [[True, False, True, False], [False, True, False, False], [True, False, False, True]]
    with pytest.raises(ValueError, match="outside"):
        as_masks([[0, 9]], n=4)


# -- lds ---------------------------------------------------------------------------------

def test_oracle_scores_give_lds_one():
    w, masks, losses = _linear_world()
    mean, per_q = lds(w, masks, losses)
    assert mean == pytest.approx(1.0) and np.allclose(per_q, 1.0)
    # a torch tensor and index-list subsets give the same answer
    mean2, _ = lds(torch.tensor(w), [np.flatnonzero(r) for r in masks], losses)
    assert mean2 == pytest.approx(1.0)


def test_sign_flip_gives_minus_one():
    w, masks, losses = _linear_world()
    mean, _ = lds(-w, masks, losses)
    assert mean == pytest.approx(-1.0)


def test_lds_invariant_to_positive_scaling_and_query_offsets():
    w, masks, losses = _linear_world()
    mean, _ = lds(5.0 * w, masks, losses + np.arange(losses.shape[1]))
    assert mean == pytest.approx(1.0)


def test_random_scores_give_lds_near_zero():
    w, masks, losses = _linear_world(n_train=200, n_query=200, m=60)
    rnd = np.random.default_rng(1).normal(size=w.shape)
    mean, per_q = lds(rnd, masks, losses)
    # per-query ρ over 60 subsets has sd ≈ 1/sqrt(59) ≈ 0.13; the mean of 200 ≈ 0.009
    assert abs(mean) < 0.05
    assert per_q.std() > 0.05


def test_noisy_oracle_is_between():
    w, masks, losses = _linear_world(n_train=100, n_query=30, m=50)
    noisy = w + np.random.default_rng(2).normal(scale=1.0, size=w.shape)
    mean, _ = lds(noisy, masks, losses)
    assert 0.3 < mean < 0.99


def test_group_scores_is_subset_sum():
    w, masks, _ = _linear_world(n_train=10, n_query=3, m=4)
    g = group_scores(w, masks)
    assert g.shape == (4, 3)
    assert g[2, 1] == pytest.approx(w[1, masks[2]].sum())


def test_lds_shape_errors_name_the_fix():
    w, masks, losses = _linear_world()
    with pytest.raises(ValueError, match=r"expected losses \[40, 8\]"):
        lds(w, masks, losses.T)
    with pytest.raises(ValueError, match="training examples"):
        lds(w[:, :-1], masks, losses)
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lds(bad, masks, losses)


def test_constant_query_is_nan_and_skipped():
    w, masks, losses = _linear_world()
    w[3] = 0.0
    with pytest.warns(RuntimeWarning, match="constant"):
        mean, per_q = lds(w, masks, losses)
    assert np.isnan(per_q[3]) and mean == pytest.approx(1.0)


# -- ground truth cache ---------------------------------------------------------------------

class _LinearTrainer:
    """A fake `train`: the 'model' outputs a loss linear in the subset, plus seed noise."""

    def __init__(self, w, noise=0.0):
        self.w, self.noise, self.calls = w, noise, []

    def __call__(self, subset, seed):
        self.calls.append((tuple(subset.indices), seed))
        mask = np.zeros(self.w.shape[1])
        mask[list(subset.indices)] = 1.0
        assert [subset[k] for k in range(len(subset))] == [float(i) for i in subset.indices]
        base = 3.0 - self.w @ mask + self.noise * np.random.default_rng(seed).normal(size=self.w.shape[0])
        m = torch.nn.Module()
        m.register_buffer("loss_of", torch.tensor(base))
        return m


def _loss(model, batch):  # query items are query ids
    return model.loss_of[batch.long()]


def _setup(tmp_path, m=12, seeds=(0, 1), noise=0.0):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 30))
    train = [float(i) for i in range(30)]
    query = list(range(5))
    masks = make_subsets(30, m, 0.5, seed=3)
    trainer = _LinearTrainer(w, noise)
    gt = train_ground_truth(trainer, train, query, _loss, masks, list(seeds), tmp_path / "gt",
                            progress=False, batch_size=2, tag="synthetic")
    return w, masks, trainer, gt


def test_ground_truth_round_trip_and_lds(tmp_path):
    w, masks, trainer, gt = _setup(tmp_path, noise=0.01)
    assert len(trainer.calls) == 12 * 2
    assert gt.losses.shape == (12, 5) and gt.losses_per_seed.shape == (12, 2, 5)
    back = load_ground_truth(tmp_path / "gt")
    assert np.array_equal(back.subsets, masks) and np.array_equal(back.losses, gt.losses)
    assert back.seeds == [0, 1] and back.seconds.shape == (12, 2)
    assert json.loads((tmp_path / "gt" / "meta.json").read_text())["tag"] == "synthetic"
    # seed-averaged noise cancels in expectation; LDS of the oracle stays ~1
    assert lds(w, back.subsets, back.losses)[0] > 0.95
    assert not list((tmp_path / "gt").rglob("*.tmp"))  # no temp files left behind


def test_resume_skips_finished_models(tmp_path):
    _setup(tmp_path)
    runs = sorted((tmp_path / "gt" / "runs").iterdir())
    for p in runs[:5]:      # simulate a crash: 5 models lost
        p.unlink()
    w, masks, trainer, gt = _setup(tmp_path)
    assert len(trainer.calls) == 5
    assert gt.losses.shape == (12, 5)


def test_crash_mid_training_keeps_finished_models(tmp_path):
    rng = np.random.default_rng(0)
    trainer = _LinearTrainer(rng.normal(size=(5, 30)))
    calls = {"n": 0}

    def crashing(subset, seed):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return trainer(subset, seed)

    masks = make_subsets(30, 5, 0.5, seed=3)
    with pytest.raises(KeyboardInterrupt):
        train_ground_truth(crashing, [float(i) for i in range(30)], list(range(5)), _loss, masks,
                           [0], tmp_path / "gt", progress=False)
    assert len(list((tmp_path / "gt" / "runs").glob("*.npz"))) == 3
    with pytest.raises(ValueError, match="incomplete"):
        load_ground_truth(tmp_path / "gt")
    train_ground_truth(trainer, [float(i) for i in range(30)], list(range(5)), _loss, masks,
                       [0], tmp_path / "gt", progress=False)
    assert len(trainer.calls) == 3 + 2


def test_cache_rejects_other_experiment(tmp_path):
    _setup(tmp_path)
    w = np.zeros((5, 30))
    with pytest.raises(ValueError, match="different subsets"):
        train_ground_truth(_LinearTrainer(w), [float(i) for i in range(30)], list(range(5)), _loss,
                           make_subsets(30, 12, 0.5, seed=4), [0], tmp_path / "gt", progress=False,
                           tag="synthetic")
    with pytest.raises(ValueError, match="tag"):
        train_ground_truth(_LinearTrainer(w), [float(i) for i in range(30)], list(range(5)), _loss,
                           make_subsets(30, 12, 0.5, seed=3), [0], tmp_path / "gt", progress=False,
                           tag="other-task")


def test_bad_train_fn_and_nan_losses(tmp_path):
    masks = make_subsets(30, 3, 0.5)
    with pytest.raises(ValueError, match="nn.Module"):
        train_ground_truth(lambda s, seed: 1.0, list(range(30)), [0], _loss, masks, [0],
                           tmp_path / "a", progress=False)
    w = np.full((1, 30), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        train_ground_truth(_LinearTrainer(w), [float(i) for i in range(30)], [0], _loss, masks, [0],
                           tmp_path / "b", progress=False)
