import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from models.metrics import average_precision
from models.nets import MLP, LogisticRegression, build_model, get_weights, set_weights
from models.spec import FeatureSpec, FeatureStats
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


# ---- nets ----------------------------------------------------------------------------------------


def test_shapes():
    x = torch.randn(7, 5)
    assert MLP(5).forward(x).shape == (7,)
    assert MLP(5, (8,), layer_norm=True)(x).shape == (7,)
    assert LogisticRegression(5)(x).shape == (7,)
    assert build_model("mlp", 5, hidden_sizes=(16, 8, 4))(x).shape == (7,)
    assert build_model("logreg", 5)(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="kind"):
        build_model("forest", 5)
    with pytest.raises(ValueError, match="hidden_sizes"):
        MLP(5, ())


def test_mlp_has_no_batchnorm_and_optional_layernorm():
    kinds = {type(m) for m in MLP(5, (8, 8)).modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert nn.LayerNorm not in kinds
    assert nn.LayerNorm in {type(m) for m in MLP(5, (8, 8), layer_norm=True).modules()}


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (build_model("mlp", 5, hidden_sizes=(8,), seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_weights_round_trip():
    src, dst = MLP(5, (8,), layer_norm=True), MLP(5, (8,), layer_norm=True)
    weights = get_weights(src)
    assert [w.shape for w in weights] == [tuple(t.shape) for t in src.state_dict().values()]
    assert all(w.dtype == np.float32 for w in weights)
    set_weights(dst, [w.astype(np.float64) for w in weights])
    x = torch.randn(4, 5)
    assert torch.equal(src(x), dst(x))
    weights[0][:] = 0.0  # a copy: the model is untouched
    assert not np.allclose(get_weights(src)[0], 0.0)


def test_set_weights_refuses_mismatch_naming_the_parameter():
    model = MLP(5, (8,))
    before = get_weights(model)
    bad = get_weights(MLP(5, (8,)))
    bad[2] = np.zeros((1, 9), dtype=np.float32)
    with pytest.raises(ValueError, match=r"net\.2\.weight.*\(1, 9\).*\(1, 8\)"):
        set_weights(model, bad)
    with pytest.raises(ValueError, match="5 arrays but the model has 4"):
        set_weights(model, [*bad, bad[0]])
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(model), strict=True))


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


# ---- feature spec --------------------------------------------------------------------------------


def banks():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 2.0, size=(50, 3))
    b = rng.normal(-1.0, 0.5, size=(30, 3))
    a[:, 2] = b[:, 2] = 7.0  # a constant feature across the consortium
    return a, b


def test_feature_stats_are_additive():
    a, b = banks()
    pooled = FeatureStats.of(np.vstack([a, b]))
    for summed in (FeatureStats.of(a) + FeatureStats.of(b), sum([FeatureStats.of(a), FeatureStats.of(b)])):
        assert isinstance(summed, FeatureStats)
        assert summed.count == pooled.count == 80
        np.testing.assert_allclose(summed.total, pooled.total)
        np.testing.assert_allclose(summed.total_sq, pooled.total_sq)
    vec = FeatureStats.of(a).to_vector() + FeatureStats.of(b).to_vector()  # what secure summation sees
    assert vec.dtype == np.float64 and vec.shape == (7,)
    np.testing.assert_allclose(FeatureStats.from_vector(vec).total_sq, pooled.total_sq)
    with pytest.raises(ValueError, match="features"):
        FeatureStats.of(a) + FeatureStats.of(a[:, :2])
    with pytest.raises(ValueError, match="x"):
        FeatureStats.of(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="v"):
        FeatureStats.from_vector(np.zeros(4))


def test_feature_spec_from_stats_matches_pooled_numpy():
    a, b = banks()
    data = np.vstack([a, b])
    spec = FeatureSpec.from_stats(
        ["amount", "hour", "const"], FeatureStats.of(a) + FeatureStats.of(b), version="v1", delay_days=7
    )
    np.testing.assert_allclose(spec.mean, data.mean(axis=0))
    np.testing.assert_allclose(spec.std[:2], data.std(axis=0)[:2])
    assert spec.std[2] == 1.0  # constant feature
    z = spec.transform(data)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:, :2].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=0), 1.0, atol=1e-5)
    frame = pd.DataFrame(data[:, ::-1], columns=["const", "hour", "amount"])
    np.testing.assert_array_equal(spec.transform(frame), z)  # a DataFrame is selected by name
    with pytest.raises(ValueError, match="3 columns"):
        spec.transform(data[:, :2])
    with pytest.raises(ValueError, match="lacks"):
        spec.transform(frame.drop(columns="hour"))


def test_feature_spec_json_round_trip_and_refusals():
    spec = FeatureSpec(
        names=("a", "b"),
        version="v2",
        mean=(0.1, 1 / 3),
        std=(1.0, 2.5),
        delay_days=7,
        extra={"entity_table_version": "2026-11-01"},
    )
    assert FeatureSpec.from_json(spec.to_json()) == spec
    doc = json.loads(spec.to_json())
    with pytest.raises(ValueError, match="not valid JSON"):
        FeatureSpec.from_json("{not json")
    with pytest.raises(ValueError, match="unknown fields: scaler"):
        FeatureSpec.from_json(json.dumps({**doc, "scaler": "per-bank"}))
    with pytest.raises(ValueError, match="lacks fields: std"):
        FeatureSpec.from_json(json.dumps({k: v for k, v in doc.items() if k != "std"}))
    with pytest.raises(ValueError, match="format"):
        FeatureSpec.from_json(json.dumps({**doc, "format": "other/9"}))
    with pytest.raises(ValueError, match="std has 1 values"):
        FeatureSpec.from_json(json.dumps({**doc, "std": [1.0]}))
    with pytest.raises(ValueError, match="delay_days"):
        FeatureSpec.from_json(json.dumps({**doc, "delay_days": "7"}))
