"""Per-round checkpoints: global model, round, feature spec, per-bank epsilon ledger and strategy state."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.config import FedFraudConfig
from models.nets import federated_model

logger = logging.getLogger(__name__)
STATE_FILE = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    """Everything a resumed run needs to continue at `round + 1` without repeating privacy spend."""

    round: int
    weights: list[np.ndarray]
    spec_json: str
    ledger: dict[str, float]
    strategy_state: dict[str, list[np.ndarray]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tail_total: list[np.ndarray] = field(default_factory=list)
    """Sum of the global models averaged so far for the served model (models/averaging.py)."""
    tail_count: int = 0


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write the round's weights and state (each file atomically; the JSON last, naming complete weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"w{i}": w for i, w in enumerate(checkpoint.weights)}
    for name, values in checkpoint.strategy_state.items():
        arrays.update({f"s_{name}_{i}": v for i, v in enumerate(values)})
    arrays.update({f"t{i}": t for i, t in enumerate(checkpoint.tail_total)})
    weights_path = directory / f"round-{checkpoint.round:04d}.npz"

    def write_npz(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    _atomic_write(weights_path, write_npz)
    state = {
        "round": checkpoint.round,
        "weights": weights_path.name,
        "n_weights": len(checkpoint.weights),
        "strategy_state": {k: len(v) for k, v in checkpoint.strategy_state.items()},
        "spec": json.loads(checkpoint.spec_json),
        "ledger": checkpoint.ledger,
        "history": checkpoint.history,
        "tail_count": checkpoint.tail_count,
        "n_tail": len(checkpoint.tail_total),
    }
    _atomic_write(
        directory / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=1, default=float))
    )
    logger.info("checkpoint: round %d -> %s", checkpoint.round, directory)
    return weights_path


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The latest checkpoint in a directory, or None when there is none."""
    state_path = directory / STATE_FILE
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text())
        with np.load(directory / state["weights"]) as npz:
            weights = [npz[f"w{i}"] for i in range(int(state["n_weights"]))]
            strategy = {
                name: [npz[f"s_{name}_{i}"] for i in range(count)]
                for name, count in state["strategy_state"].items()
            }
            tail = [npz[f"t{i}"] for i in range(int(state.get("n_tail", 0)))]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{state_path}: unreadable checkpoint ({exc}); move it away to start afresh"
        ) from exc
    return Checkpoint(
        round=int(state["round"]),
        weights=weights,
        spec_json=json.dumps(state["spec"]),
        ledger={str(k): float(v) for k, v in state["ledger"].items()},
        strategy_state=strategy,
        history=list(state.get("history", [])),
        tail_total=tail,
        tail_count=int(state.get("tail_count", 0)),
    )


def check_resumable(
    checkpoint: Checkpoint, config: FedFraudConfig, *, n_features: int, directory: Path
) -> None:
    """Refuse to resume from weights that do not fit the model this run configures (the keys named)."""
    model = federated_model(config, n_features)
    expected = [tuple(p.shape) for p in model.state_dict().values()]
    found = [tuple(np.shape(w)) for w in checkpoint.weights]
    if found != expected:
        raise ValueError(
            f"{directory / STATE_FILE}: the checkpoint's weights have shapes {found}, the configured model "
            f"{expected} (config keys 'model', 'hidden-sizes', 'dp-hidden-sizes'); resume with the settings "
            "it was written with, or move it away to start afresh"
        )
