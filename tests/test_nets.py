"""The networks and their weights, and the feature spec that standardizes their inputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from models.nets import MLP, LogisticRegression, build_model, get_weights, set_weights
from models.spec import FeatureSpec, FeatureStats

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
