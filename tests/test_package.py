"""Model packages: export and load round trip, ONNX equals torch, tampered or mismatched packages refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from clients.scoring import Scorer
from models.nets import build_model
from models.onnx_export import OnnxExportError, to_onnx
from models.package import (
    PACKAGE_FORMAT,
    ModelPackage,
    PackageError,
    export_package,
    load_package,
    verify_package,
)
from models.spec import FeatureSpec
from models.threshold import Threshold, threshold_for_fpr
from tests._helpers_scoring import bank_file, train_package


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_package(bank_file(tmp_path_factory.mktemp("bank")))


@pytest.fixture(scope="module")
def trained_entity(tmp_path_factory):
    return train_package(bank_file(tmp_path_factory.mktemp("bank-e")), entity=True)


@pytest.fixture
def exported(trained, tmp_path):
    return export_package(trained.package, tmp_path / "model")


def _rewrite(root, name, text):
    """Change a file and fix its manifest entry: a consistent package, as a different fedfraud would write."""
    (root / name).write_text(text)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_keeps_everything(trained, exported):
    loaded = load_package(exported)
    original = trained.package
    assert loaded.spec == original.spec and loaded.threshold == original.threshold
    assert loaded.method == "federated" and loaded.metrics == original.metrics
    for a, b in zip(loaded.weights, original.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    manifest = verify_package(exported)
    assert manifest["versions"] == {
        "package": PACKAGE_FORMAT,
        "features": "local-v1",
        "consortium": None,
        "entity_table": None,
    }
    listed = set(manifest["files"])
    assert listed == {p.name for p in exported.iterdir()} - {"manifest.json"}
    assert not list(exported.parent.glob(".model.tmp-*"))


def test_onnx_and_torch_scores_agree(trained, exported):
    package = load_package(exported)
    rng = np.random.default_rng(0)
    wild = trained.x[:2000] * rng.uniform(0.5, 3.0, trained.x[:2000].shape).astype(np.float32)
    for x in (trained.x, wild):
        onnx_scores = Scorer(package, engine="onnx", threads=1).scores(x)
        torch_scores = Scorer(package, engine="torch").scores(x)
        assert np.abs(onnx_scores - torch_scores).max() < 1e-5
    # the torch path is the training side's path (logits bit for bit; the float64 sigmoid to its last bits)
    torch_test = Scorer(package, engine="torch").scores(trained.x[trained.test])
    np.testing.assert_allclose(torch_test, trained.expected, rtol=0, atol=1e-15)


def test_onnx_export_is_deterministic_and_refuses_unknown_layers(trained):
    model = trained.package.build_model()
    assert to_onnx(model, trained.package.spec) == to_onnx(model, trained.package.spec)
    logreg = build_model("logreg", len(trained.package.spec.names), seed=0)
    assert to_onnx(logreg, trained.package.spec)
    with pytest.raises(OnnxExportError, match="Sequential"):
        to_onnx(model.net, trained.package.spec)


def test_checksum_mismatch_is_refused(exported):
    data = bytearray((exported / "weights.npz").read_bytes())
    data[-40] ^= 0xFF
    (exported / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"weights\.npz: checksum mismatch") as info:
        load_package(exported)
    assert info.value.path.endswith("weights.npz")


def test_missing_file_is_refused(exported):
    (exported / "model.onnx").unlink()
    with pytest.raises(PackageError, match=r"model\.onnx: missing"):
        load_package(exported)


def test_not_a_package_and_unknown_format_are_refused(exported, tmp_path):
    with pytest.raises(PackageError, match="not a model package"):
        load_package(tmp_path)
    manifest = json.loads((exported / "manifest.json").read_text())
    (exported / "manifest.json").write_text(json.dumps({**manifest, "format": "fedfraud.model-package/9"}))
    with pytest.raises(PackageError, match=r"package format 'fedfraud\.model-package/9'"):
        load_package(exported)


def test_feature_version_this_code_does_not_compute_is_refused(exported):
    spec = json.loads((exported / "feature_spec.json").read_text())
    _rewrite(exported, "feature_spec.json", json.dumps({**spec, "version": "local-v2"}))
    with pytest.raises(
        PackageError, match=r"manifest.json: feature version 'local-v1' does not match .*'local-v2'"
    ):
        load_package(exported)  # the manifest still says local-v1
    manifest = json.loads((exported / "manifest.json").read_text())
    manifest["versions"]["features"] = "local-v2"
    (exported / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="'local-v2' is not supported"):
        load_package(exported)


def test_feature_names_out_of_order_are_refused(exported):
    spec = json.loads((exported / "feature_spec.json").read_text())
    spec["names"][0], spec["names"][1] = spec["names"][1], spec["names"][0]
    _rewrite(exported, "feature_spec.json", json.dumps(spec))
    with pytest.raises(PackageError, match="position 0: 'hour_sin' != 'log_amount'"):
        load_package(exported)


def test_weights_of_another_model_are_refused(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    manifest["model"]["hidden_sizes"] = [32, 16]
    (exported / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"weights\.npz: does not fit"):
        load_package(exported)


def test_entity_package_round_trip_and_table_tampering(trained_entity, tmp_path):
    root = export_package(trained_entity.package, tmp_path / "model")
    loaded = load_package(root)
    assert loaded.entity is not None and loaded.spec.version == "local-v1+consortium-v1"
    np.testing.assert_array_equal(loaded.entity.table, trained_entity.package.entity.table)
    manifest = verify_package(root)
    assert manifest["versions"]["consortium"] == "consortium-v1"
    assert manifest["versions"]["entity_table"] == loaded.entity.version
    assert "key" not in json.loads((root / "entity_release.json").read_text())
    table = np.load(root / "entity_table.npy")
    table[0, 3, 5] += 1.0
    np.save(root / "entity_table.npy", table)
    with pytest.raises(PackageError, match=r"entity_table\.npy: checksum mismatch"):
        load_package(root)


def test_export_is_atomic_and_refuses_to_overwrite(trained, exported):
    with pytest.raises(FileExistsError, match="not empty"):
        export_package(trained.package, exported)
    # a package whose spec does not match the model's features is refused before anything is written
    spec = trained.package.spec
    bad = FeatureSpec(spec.names[:-1], spec.version, spec.mean[:-1], spec.std[:-1], spec.delay_days)
    target = exported.parent / "other"
    with pytest.raises(PackageError, match="feature names do not match"):
        export_package(ModelPackage(**{**trained.package.__dict__, "spec": bad}), target)
    assert not target.exists() and not list(exported.parent.glob(".other*"))
    export_package(trained.package, exported, overwrite=True)
    load_package(exported)


def test_threshold_keeps_the_target_false_positive_rate():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.random(1000), rng.random(30) + 0.5])
    labels = np.concatenate([np.zeros(1000), np.ones(30)])
    t = threshold_for_fpr(scores, labels, target_fpr=0.01, source="test")
    negatives = np.sort(scores[:1000])
    assert int((negatives >= t.value).sum()) == 10 and t.achieved_fpr == 0.01
    assert negatives[-11] < t.value <= negatives[-10]
    assert t.recall == float((scores[1000:] >= t.value).mean())
    tied = threshold_for_fpr(np.full(50, 0.3), np.zeros(50), target_fpr=0.05, source="ties")
    assert tied.achieved_fpr == 0.0 and tied.recall is None
    assert Threshold.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="no genuine"):
        threshold_for_fpr(np.ones(3), np.ones(3), source="frauds only")
