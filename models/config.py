"""The one configuration: `[tool.flwr.app.config]` in pyproject.toml, parsed once into frozen dataclasses.

Keys are kebab-case (Flower's run-config style). CLI flags and `flwr run --run-config` override them;
every value is checked here and a bad one is refused with a message naming its key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from models.config_entity import EntityConfig, parse_entity
from models.config_values import (
    ConfigError,
    bank_epsilons,
    checked,
    is_date_or_empty,
    layer_sizes,
    pos_weight_value,
)

__all__ = ["ConfigError", "FedFraudConfig", "load_config", "parse_config", "read_defaults"]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
MODELS = ("mlp", "logreg")
STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass(frozen=True)
class SplitConfig:
    """Time split: train window, label-delay window (unused), test window, in days."""

    train_days: int
    delay_days: int
    test_days: int
    test_fraction: float
    test_start: str


@dataclass(frozen=True)
class TrainConfig:
    """Model and (local) training settings."""

    model: str
    hidden_sizes: tuple[int, ...]
    lr: float
    batch_size: int
    central_epochs: int
    local_epochs: int
    weight_decay: float
    pos_weight: float | None
    seed: int


@dataclass(frozen=True)
class FederationConfig:
    """Federated rounds, strategy and SecAgg+ settings (0 = chosen from the number of banks)."""

    rounds: int
    fraction_fit: float
    min_fit_banks: int
    strategy: str
    proximal_mu: float
    server_lr: float
    tail_average: float
    secagg: bool
    secagg_num_shares: int
    secagg_reconstruction_threshold: int
    secagg_quantization_range: int
    secagg_modulus_range: int
    checkpoint_dir: str
    data_dir: str
    audit_log: str = ""
    evaluate_in_fit: bool = True


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP-SGD at each bank (budget per bank) and optional client-level DP at the server."""

    dp: bool
    dp_epsilon: float
    dp_delta: float
    dp_max_grad_norm: float
    dp_lr: float
    dp_bank_epsilon: dict[int, float]
    central_dp: bool
    central_dp_noise: float
    central_dp_clip: float
    dp_hidden_sizes: tuple[int, ...] = ()

    def learning_rate(self, plain_lr: float) -> float:
        """The local learning rate: DP-SGD's clipped, noised gradients need their own (larger) step."""
        return self.dp_lr if self.dp else plain_lr

    def hidden_sizes(self, plain: tuple[int, ...]) -> tuple[int, ...]:
        """The federated MLP's hidden layers: smaller under DP-SGD (its noise grows with the weights)."""
        return (self.dp_hidden_sizes or plain) if self.dp else plain

    def epsilon_for(self, bank: int) -> float:
        """The privacy budget of one bank (its override, else the consortium default)."""
        return self.dp_bank_epsilon.get(bank, self.dp_epsilon)


@dataclass(frozen=True)
class FedFraudConfig:
    """All settings of a run, resolved from pyproject defaults and overrides."""

    split: SplitConfig
    train: TrainConfig
    federation: FederationConfig
    privacy: PrivacyConfig
    entity: EntityConfig

    @property
    def federated_hidden_sizes(self) -> tuple[int, ...]:
        """Hidden layers of the federated model (`dp-hidden-sizes` under DP-SGD, else `hidden-sizes`)."""
        return self.privacy.hidden_sizes(self.train.hidden_sizes)

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved settings as kebab-case keys (what `config.json` records)."""
        out: dict[str, Any] = {}
        for section in (self.split, self.train, self.federation, self.privacy, self.entity):
            for f in fields(section):
                value = getattr(section, f.name)
                if isinstance(value, dict):
                    value = ",".join(f"{k}:{v}" for k, v in value.items())
                out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out


def read_defaults(path: Path = PYPROJECT) -> dict[str, Any]:
    """Read `[tool.flwr.app.config]` from the project's pyproject.toml."""
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: not found; fedfraud reads its defaults from [tool.flwr.app.config] there "
            "(install the project with `pip install -e .`)"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    try:
        return dict(doc["tool"]["flwr"]["app"]["config"])
    except KeyError as exc:
        raise ConfigError(f"{path}: has no [tool.flwr.app.config] table") from exc


SECTIONS = (SplitConfig, TrainConfig, FederationConfig, PrivacyConfig, EntityConfig)


def parse_config(raw: Mapping[str, Any]) -> FedFraudConfig:
    """Check every key of a flat kebab-case mapping and build the frozen configuration."""
    known = {f.name.replace("_", "-") for cls in SECTIONS for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"config key '{unknown[0]}' is unknown (known keys: {', '.join(sorted(known))})")
    pos = lambda v: v > 0  # noqa: E731
    nonneg = lambda v: v >= 0  # noqa: E731
    split = SplitConfig(
        train_days=checked(raw, "train-days", int, pos, "a positive integer"),
        delay_days=checked(raw, "delay-days", int, nonneg, "a non-negative integer"),
        test_days=checked(raw, "test-days", int, pos, "a positive integer"),
        test_fraction=checked(raw, "test-fraction", float, lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
        test_start=checked(raw, "test-start", str, is_date_or_empty, "empty or a date YYYY-MM-DD"),
    )
    train = TrainConfig(
        model=checked(raw, "model", str, lambda v: v in MODELS, f"one of {', '.join(MODELS)}"),
        hidden_sizes=checked(
            raw,
            "hidden-sizes",
            layer_sizes,
            lambda v: len(v) > 0 and all(h > 0 for h in v),
            "a comma-separated list of positive layer sizes",
        ),
        lr=checked(raw, "lr", float, lambda v: 0 < v < 10, "a learning rate in (0, 10)"),
        batch_size=checked(raw, "batch-size", int, pos, "a positive integer"),
        central_epochs=checked(raw, "central-epochs", int, pos, "a positive integer"),
        local_epochs=checked(raw, "local-epochs", int, pos, "a positive integer"),
        weight_decay=checked(raw, "weight-decay", float, nonneg, "a non-negative number"),
        pos_weight=checked(
            raw, "pos-weight", pos_weight_value, lambda v: v is None or v > 0, "'auto' or a positive number"
        ),
        seed=checked(raw, "seed", int, nonneg, "a non-negative integer"),
    )
    return FedFraudConfig(
        split=split, train=train, federation=_federation(raw), privacy=_privacy(raw), entity=parse_entity(raw)
    )


def _federation(raw: Mapping[str, Any]) -> FederationConfig:
    pos = lambda v: v > 0  # noqa: E731
    nonneg = lambda v: v >= 0  # noqa: E731
    return FederationConfig(
        rounds=checked(raw, "rounds", int, pos, "a positive integer"),
        fraction_fit=checked(raw, "fraction-fit", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        min_fit_banks=checked(raw, "min-fit-banks", int, pos, "a positive integer"),
        strategy=checked(raw, "strategy", str, lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
        proximal_mu=checked(raw, "proximal-mu", float, nonneg, "a non-negative number"),
        server_lr=checked(raw, "server-lr", float, pos, "a positive number"),
        tail_average=checked(
            raw, "tail-average", float, lambda v: 0 <= v <= 1, "a fraction of the rounds in [0, 1]"
        ),
        secagg=checked(raw, "secagg", bool, lambda v: True, "true or false"),
        secagg_num_shares=checked(raw, "secagg-num-shares", int, nonneg, "0 (auto) or a share count > 2"),
        secagg_reconstruction_threshold=checked(
            raw, "secagg-reconstruction-threshold", int, nonneg, "0 (auto) or a positive integer"
        ),
        secagg_quantization_range=checked(
            raw, "secagg-quantization-range", int, lambda v: v >= 2**8, "an integer >= 256"
        ),
        secagg_modulus_range=checked(
            raw,
            "secagg-modulus-range",
            int,
            lambda v: v >= 2**16 and v & (v - 1) == 0,
            "a power of two >= 65536",
        ),
        checkpoint_dir=checked(raw, "checkpoint-dir", str, lambda v: True, "a directory path (or empty)"),
        data_dir=checked(raw, "data-dir", str, lambda v: True, "a directory path (or empty)"),
        audit_log=checked(raw, "audit-log", str, lambda v: True, "a file path (or empty)"),
        evaluate_in_fit=checked(raw, "evaluate-in-fit", bool, lambda v: True, "true or false"),
    )


def _privacy(raw: Mapping[str, Any]) -> PrivacyConfig:
    pos = lambda v: v > 0  # noqa: E731
    return PrivacyConfig(
        dp=checked(raw, "dp", bool, lambda v: True, "true or false"),
        dp_epsilon=checked(raw, "dp-epsilon", float, pos, "a positive epsilon"),
        dp_delta=checked(raw, "dp-delta", float, lambda v: 0 < v < 1, "a delta in (0, 1)"),
        dp_max_grad_norm=checked(raw, "dp-max-grad-norm", float, pos, "a positive clipping norm"),
        dp_lr=checked(raw, "dp-lr", float, lambda v: 0 < v < 100, "a learning rate in (0, 100)"),
        dp_bank_epsilon=checked(
            raw,
            "dp-bank-epsilon",
            bank_epsilons,
            lambda v: all(e > 0 for e in v.values()),
            "a list BANK:EPSILON,... of positive budgets",
        ),
        central_dp=checked(raw, "central-dp", bool, lambda v: True, "true or false"),
        central_dp_noise=checked(
            raw, "central-dp-noise", float, lambda v: v >= 0, "a non-negative multiplier"
        ),
        central_dp_clip=checked(raw, "central-dp-clip", float, pos, "a positive clipping norm"),
        dp_hidden_sizes=checked(
            raw,
            "dp-hidden-sizes",
            layer_sizes,
            lambda v: all(h > 0 for h in v),
            "empty (as hidden-sizes) or a comma-separated list of positive layer sizes",
        ),
    )


def load_config(overrides: Mapping[str, Any] | None = None, *, path: Path = PYPROJECT) -> FedFraudConfig:
    """Resolve the configuration: pyproject defaults, then overrides (CLI flags, run config); None skipped."""
    raw = read_defaults(path)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_config(raw)
