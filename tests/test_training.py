"""Local training: loaders, optimizers, epochs (FedProx, Opacus' DP loaders), scores and losses."""

import math
from typing import Any

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from models.metrics import average_precision
from models.nets import MLP, LogisticRegression, build_model, get_weights, set_weights
from models.training import (
    TrainStats,
    evaluate_loss,
    make_loader,
    make_optimizer,
    pos_weight_for,
    predict_scores,
    train_epochs,
    train_model,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny models on a shared 2-core box: a second intra-op thread only adds spin-waits (10x slower
    # under load). Set here for these tests only and restored; library code never touches it.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def separable(n=2000, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 1.5).astype(np.float32)  # ~14% positives, linearly separable
    return x, y


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def distance(a, b):
    return float(sum(((p - q) ** 2).sum() for p, q in zip(a, b, strict=True)).sqrt())


# ---- training ------------------------------------------------------------------------------------


def test_pos_weight_for():
    assert pos_weight_for(np.array([0, 0, 0, 1])) == pytest.approx(3.0)
    assert pos_weight_for(np.zeros(10)) == 1.0
    assert pos_weight_for(np.ones(3)) == 1.0  # no negatives: a zero weight would silence the positives
    assert pos_weight_for(np.r_[np.zeros(5000), 1.0]) == 1000.0
    with pytest.raises(ValueError, match="labels"):
        pos_weight_for(np.array([0, 2]))


def test_train_model_learns_and_is_deterministic():
    x, y = separable()
    xt, yt = separable(seed=1)
    kw: dict[str, Any] = {"kind": "mlp", "hidden_sizes": (16, 16), "epochs": 3, "batch_size": 64, "lr": 0.01}
    rng_state = torch.get_rng_state()
    model = train_model(x, y, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), rng_state)  # no global seeding side effect
    assert average_precision(yt, predict_scores(model, xt)) > 0.9
    again = train_model(x, y, seed=3, **kw)
    other = train_model(x, y, seed=4, **kw)
    w, w_again, w_other = get_weights(model), get_weights(again), get_weights(other)
    assert all(np.array_equal(a, b) for a, b in zip(w, w_again, strict=True))
    assert not np.array_equal(w[0], w_other[0])
    logreg = train_model(x, y, seed=0, **{**kw, "kind": "logreg"})
    assert average_precision(yt, predict_scores(logreg, xt)) > 0.9


def test_train_epochs_skips_empty_batches_and_counts_examples():
    x, y = separable(n=15)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batches = [(xt[:0], yt[:0]), (xt[:10], yt[:10]), (xt[:0], yt[:0]), (xt[10:], yt[10:])]
    model = MLP(5, (8,))
    before = evaluate_loss(model, x, y, pos_weight=2.0)
    # A (numerically) frozen SGD step: the per-example mean of the batch losses is the full-data loss,
    # which only holds when batches (10 and 5 rows) are weighted by their example counts.
    stats = train_epochs(
        model, torch.optim.SGD(model.parameters(), lr=1e-12), batches, epochs=2, pos_weight=2.0
    )
    assert isinstance(stats, TrainStats)
    assert (stats.examples, stats.steps) == (30, 4)
    assert stats.loss == pytest.approx(before, rel=1e-5)
    empty = train_epochs(model, make_optimizer(model, lr=0.1), [(xt[:0], yt[:0])], epochs=1, pos_weight=1.0)
    assert (empty.examples, empty.steps) == (0, 0) and math.isnan(empty.loss)


def test_fedprox_pulls_toward_global_weights():
    x, y = separable(n=512)
    moved = {}
    for mu in (0.0, 1.0, 1e6):
        model = build_model("mlp", 5, hidden_sizes=(8,), seed=0)
        start = params_of(model)
        train_epochs(
            model,
            make_optimizer(model, lr=0.05),
            make_loader(x, y, batch_size=64, seed=0),
            epochs=2,
            pos_weight=6.0,
            proximal_mu=mu,
            global_weights=start,
        )
        moved[mu] = distance(params_of(model), start)
    assert moved[0.0] > moved[1.0] > moved[1e6]
    assert moved[1e6] < 1e-3 * moved[0.0]
    model = MLP(5, (8,))
    with pytest.raises(ValueError, match="global_weights"):
        train_epochs(model, make_optimizer(model, lr=0.1), [], epochs=1, pos_weight=1.0, proximal_mu=0.1)
    with pytest.raises(ValueError, match=r"global_weights\[0\]"):
        train_epochs(
            model,
            make_optimizer(model, lr=0.1),
            [],
            epochs=1,
            pos_weight=1.0,
            proximal_mu=0.1,
            global_weights=[torch.zeros(2, 2), *params_of(model)[1:]],
        )


def test_make_loader_and_optimizer():
    x, y = separable(n=10)
    batches = list(make_loader(x, y, batch_size=4, seed=0, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.float32
    assert torch.equal(batches[0][0], torch.from_numpy(x[:4]))
    order = [torch.cat([b[1] for b in make_loader(x, y, batch_size=4, seed=s)]) for s in (0, 0)]
    assert torch.equal(order[0], order[1])
    model = MLP(5)
    assert isinstance(make_optimizer(model, name="sgd", lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="name"):
        make_optimizer(model, name="lbfgs", lr=0.1)
    with pytest.raises(ValueError, match="y"):
        make_loader(x, y[:5], batch_size=4, seed=0)


def test_predict_scores_and_evaluate_loss():
    model = LogisticRegression(1)
    set_weights(model, [np.array([[1.0]], np.float32), np.array([0.0], np.float32)])
    model.train()
    x = np.array([[0.0], [20.0], [25.0]], dtype=np.float32)
    scores = predict_scores(model, x, batch_size=2)
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert scores[0] == pytest.approx(0.5)
    assert scores[1] < scores[2] < 1.0  # float64 sigmoid: high logits do not all tie at 1.0
    assert model.training  # the caller's mode is restored
    y = np.array([1.0, 0.0, 1.0])
    # Weighted BCE per row: pos_weight * softplus(-z) for positives, softplus(z) for negatives.
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    expected = (3.0 * softplus(0.0) + softplus(20.0) + 3.0 * softplus(-25.0)) / 3
    assert evaluate_loss(model, x, y, pos_weight=3.0) == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_opacus_accepts_mlp_and_train_epochs_runs_on_dp_loader():
    x, y = separable(n=40)
    model = build_model("mlp", 5, hidden_sizes=(8, 8), seed=0)
    start = params_of(model)
    engine = PrivacyEngine()
    # batch_size 2 over 40 rows: sample rate 1/20, so about (1 - 1/20)^40 = 13% of batches are empty.
    dp_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=make_optimizer(model, lr=0.05),
        data_loader=make_loader(x, y, batch_size=2, seed=0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    sizes = [len(b[0]) for b in loader]
    assert 0 in sizes  # Poisson sampling does give empty batches here
    stats = train_epochs(dp_model, optimizer, loader, epochs=3, pos_weight=pos_weight_for(y))
    assert stats.examples > 0 and stats.steps < 3 * len(sizes) and math.isfinite(stats.loss)
    assert engine.get_epsilon(delta=1e-5) > 0
    # FedProx still acts under DP (a proximal loss term would be discarded by the DP optimizer).
    train_epochs(
        dp_model,
        optimizer,
        loader,
        epochs=1,
        pos_weight=1.0,
        proximal_mu=1e6,
        global_weights=params_of(dp_model),
    )
    moved = params_of(dp_model)
    train_epochs(dp_model, optimizer, loader, epochs=1, pos_weight=1.0, proximal_mu=1e6, global_weights=moved)
    assert distance(params_of(dp_model), moved) < 1e-3 * distance(moved, start)
