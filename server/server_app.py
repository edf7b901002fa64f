"""The consortium's Flower ServerApp: secure statistics round, then guarded (SecAgg+) federated training.

Flower wiring only. SecAgg+ exists only in the legacy API, so rounds run as `DefaultWorkflow` over a
`LegacyContext`: a statistics round (secure mean of the banks' feature moments, for consortium-wide
standardization), then training rounds with evaluation, a checkpoint after every round, and resume
from the last one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from models.averaging import TailAverage, first_averaged_round
from models.config import FedFraudConfig, parse_config
from models.feature_names import CONSORTIUM_FEATURES, CONSORTIUM_VERSION, FEATURE_VERSION, LOCAL_FEATURES
from models.federation import CLIPPING_RANGE, MAX_WEIGHT, STATS_CLIP, TASK, TASK_STATS
from models.nets import federated_model, get_weights, init_output_bias
from models.spec import FeatureSpec, FeatureStats
from server.audit import RunAudit, open_run_audit
from server.checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from server.entity_release import entity_round
from server.fast_grid import PromptGrid, prompt_object_pulls
from server.rounds import run_round
from server.secagg import SecAggParams, choose_secagg
from server.strategy import RecordedClientSideDP, SecureMeanStrategy, build_strategy

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
logger = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """A federated run cannot go on (e.g. the secure statistics round produced no result)."""


@dataclass
class ServerSettings:
    """What the ServerApp needs beyond the run config; `sink` receives per-round records (simulation)."""

    config: FedFraudConfig
    n_banks: int
    feature_names: tuple[str, ...]
    feature_version: str
    checkpoint_dir: Path | None = None
    max_weight: float = MAX_WEIGHT
    entity_start: str = ""
    entity_days: int = 0
    sink: dict[str, Any] = field(default_factory=dict)
    on_progress: Callable[[str], None] | None = None
    audit: RunAudit | None = None
    """Deployment: the audit log; also lets rounds go on when a bank drops out (down to min-fit-banks)."""


def _fit_workflow(settings: ServerSettings, params: SecAggParams | None) -> Any:
    return SecAggPlusWorkflow(**params.workflow_kwargs()) if params is not None else None


def stats_round(grid: Grid, context: Context, settings: ServerSettings) -> FeatureSpec:
    """Consortium-wide feature means and variances from the banks' moments, summed under SecAgg+."""
    n_features = len(settings.feature_names)
    bounds = np.concatenate([np.full(n_features, STATS_CLIP), np.full(n_features, STATS_CLIP**2), [1.0]])
    scales = bounds / CLIPPING_RANGE
    strategy = SecureMeanStrategy(
        payload=[scales],
        config={TASK: TASK_STATS},
        n_banks=settings.n_banks,
        sink=settings.sink,
        key="stats_mean",
    )
    params = None
    if settings.config.federation.secagg:
        q = 2 ** int(math.log2((settings.config.federation.secagg_modulus_range - 1) // settings.n_banks))
        params = choose_secagg(settings.n_banks, settings.config.federation, max_weight=settings.max_weight)
        params = SecAggParams(**{**params.workflow_kwargs(), "quantization_range": q})
    run_round(grid, context, strategy, secagg=params.workflow_kwargs() if params is not None else None)
    if "stats_mean" not in settings.sink:
        raise FederationError("the secure statistics round produced no result (too few banks answered)")
    moments = np.asarray(settings.sink["stats_mean"], dtype=np.float64) * scales
    stats = FeatureStats(count=1.0, total=moments[:n_features], total_sq=moments[n_features : 2 * n_features])
    settings.sink["fraud_rate"] = float(np.clip(moments[-1], 1e-6, 0.5))
    return FeatureSpec.from_stats(
        settings.feature_names,
        stats,
        version=settings.feature_version,
        delay_days=settings.config.split.delay_days,
    )


def _wrap_central_dp(strategy: Strategy, config: FedFraudConfig, n_per_round: int) -> Strategy:
    privacy = config.privacy
    if not privacy.central_dp:
        return strategy
    std = privacy.central_dp_noise * privacy.central_dp_clip / n_per_round
    if n_per_round < 100:
        logger.warning(
            "client-level DP with %d banks per round adds noise of std %.3g to every weight; "
            "below ~100 banks per round this usually ruins the model",
            n_per_round,
            std,
        )
    return RecordedClientSideDP(
        strategy,
        noise_multiplier=privacy.central_dp_noise,
        clipping_norm=privacy.central_dp_clip,
        num_sampled_clients=n_per_round,
    )


def initial_weights(config: FedFraudConfig, n_features: int, fraud_rate: float) -> list[np.ndarray]:
    """The first global model, its output bias at the (loss-weighted) consortium fraud rate."""
    model = federated_model(config, n_features, seed=config.train.seed)
    pos_weight = config.train.pos_weight or (1 - fraud_rate) / fraud_rate  # 'auto' balances the classes
    init_output_bias(model, fraud_rate=fraud_rate, pos_weight=pos_weight)
    return get_weights(model)


class RoundRecorder:
    """Merges a round's records (fit, the banks' reports, evaluation); checkpoints when the round closes.

    The fit carries each bank's privacy report, so a round closes (ledger, audit, checkpoint) right after
    its aggregate; evaluation metrics join the round's record when they arrive: with the next round's fit
    (`evaluate-in-fit`) or from an evaluation round.
    """

    def __init__(self, settings: ServerSettings, spec_json: str, start: Checkpoint | None) -> None:
        self.settings, self.spec_json = settings, spec_json
        self.history: list[dict[str, Any]] = list(start.history) if start else []
        self.ledger: dict[str, float] = dict(start.ledger) if start else {}
        self.weights: list[np.ndarray] = list(start.weights) if start else []
        fed = settings.config.federation
        self.tail = TailAverage(first=first_averaged_round(fed.rounds, fed.tail_average))
        if start is not None:
            self.tail.total, self.tail.count = list(start.tail_total), start.tail_count
        self.strategy: Any = None
        settings.sink.setdefault("rounds", {}).update({int(h["round"]): h for h in self.history})

    def __call__(self, round_no: int, info: dict[str, Any]) -> None:
        """Record a fit result, a bank's report, an evaluation or the close of a round."""
        record = self.settings.sink.setdefault("rounds", {}).setdefault(round_no, {"round": round_no})
        if "weights" in info:
            self.weights = [np.asarray(w) for w in info["weights"]]
            self.settings.sink["weights"] = self.weights
            self.settings.sink.setdefault("round_weights", {})[round_no] = self.weights
            self.tail.add(round_no, self.weights)
            self.settings.sink["served_weights"] = self.tail.value(self.weights)
        banks = record.setdefault("banks", {})
        for bank, metrics in info.get("banks", {}).items():
            banks[bank] = {**banks.get(bank, {}), **metrics}
        record.update({k: v for k, v in info.items() if k not in ("weights", "banks", "closed")})
        if info.get("closed"):
            self._close(round_no, record)
        elif "banks" in info and any(h["round"] == round_no for h in self.history):
            self._evaluated(round_no, record)

    def _close(self, round_no: int, record: dict[str, Any]) -> None:
        self.ledger.update({b: float(m["epsilon"]) for b, m in record["banks"].items() if "epsilon" in m})
        record["ledger"] = dict(self.ledger)
        self.history.append(record)
        if self.settings.audit is not None:
            self.settings.audit.round(round_no, record, self.weights)
        self._checkpoint(round_no)
        if self.settings.on_progress is not None:
            self.settings.on_progress(f"federated round {round_no}/{self.settings.config.federation.rounds}")

    def _evaluated(self, round_no: int, record: dict[str, Any]) -> None:
        """Metrics of a closed round arrived; the last round's are saved at once (no next checkpoint)."""
        if round_no == self.settings.config.federation.rounds:
            self._checkpoint(round_no, audit=False)

    def _checkpoint(self, round_no: int, *, audit: bool = True) -> None:
        if self.settings.checkpoint_dir is None:
            return
        inner = getattr(self.strategy, "strategy", self.strategy)
        state = {k: list(getattr(inner, k)) for k in ("m_t", "v_t") if getattr(inner, k, None) is not None}
        path = save_checkpoint(
            self.settings.checkpoint_dir,
            Checkpoint(
                round=round_no,
                weights=self.weights,
                spec_json=self.spec_json,
                ledger=self.ledger,
                strategy_state=state,
                history=self.history,
                tail_total=self.tail.total,
                tail_count=self.tail.count,
            ),
        )
        if audit and self.settings.audit is not None:
            self.settings.audit.checkpoint(round_no, path)


def run_federation(grid: Grid, context: Context, settings: ServerSettings) -> None:
    """Statistics round (unless resuming), then the remaining training rounds."""
    config, fed = settings.config, settings.config.federation
    start = load_checkpoint(settings.checkpoint_dir) if settings.checkpoint_dir else None
    if start is not None and settings.checkpoint_dir is not None:
        check_resumable(
            start, config, n_features=len(settings.feature_names), directory=settings.checkpoint_dir
        )
        logger.info("resuming after round %d from %s", start.round, settings.checkpoint_dir)
        spec_json, initial = start.spec_json, start.weights
    else:
        if config.entity.enabled:
            try:
                entity_round(grid, context, settings)
            finally:  # a release refused after decoding (too few noise shares) is audited too
                if settings.audit is not None and "entity_contributing" in settings.sink:
                    settings.audit.entity_release(settings.sink)
        spec_json = stats_round(grid, context, settings).to_json()
        if settings.audit is not None:
            settings.audit.stats_round("stats_round")
        initial = initial_weights(config, len(settings.feature_names), settings.sink["fraud_rate"])
    settings.sink.update(spec_json=spec_json, weights=initial)
    done = start.round if start else 0
    if done >= fed.rounds:
        logger.info("all %d rounds are done already", fed.rounds)
        return
    recorder = RoundRecorder(settings, spec_json, start)
    recorder.weights = list(initial)
    n_per_round = max(1, round(fed.fraction_fit * settings.n_banks))
    secagg = choose_secagg(n_per_round, fed, max_weight=settings.max_weight) if fed.secagg else None
    strategy = build_strategy(
        config, initial, n_banks=settings.n_banks, spec_json=spec_json, on_round=recorder, round_offset=done
    )
    if start is not None and start.strategy_state:
        for name, values in start.strategy_state.items():
            setattr(strategy, name, values)
    if settings.audit is not None:  # deployment: a bank that drops out must not stall the next rounds
        for name in ("min_fit_clients", "min_evaluate_clients", "min_available_clients"):
            setattr(strategy, name, min(getattr(strategy, name), max(2, fed.min_fit_banks)))
    strategy = _wrap_central_dp(strategy, config, n_per_round)
    recorder.strategy = strategy
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=fed.rounds - done), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=_fit_workflow(settings, secagg))(grid, legacy)


def make_server_app(settings: ServerSettings) -> ServerApp:
    """A ServerApp bound to these settings (simulation passes them here: its run config is empty)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, context, settings)

    return app


app = ServerApp()


@app.main()
def _deployed_main(grid: Grid, context: Context) -> None:
    """Deployment (`flwr run`): settings from the run config; every connected bank takes part."""
    config = parse_config(dict(context.run_config))
    grid = PromptGrid(grid)
    prompt_object_pulls()
    directory = Path(config.federation.checkpoint_dir) if config.federation.checkpoint_dir else None
    audit = open_run_audit(config.federation.audit_log, directory, grid)
    if audit is not None:
        start = load_checkpoint(directory) if directory else None
        audit.run_start(context.run_id, dict(context.run_config), resume_round=start.round if start else 0)
    nodes = wait_for_banks(grid, minimum=config.federation.min_fit_banks)
    if audit is not None:
        audit.banks_joined(nodes)
    settings = ServerSettings(
        config=config,
        n_banks=len(nodes),
        feature_names=LOCAL_FEATURES + (CONSORTIUM_FEATURES if config.entity.enabled else ()),
        feature_version=FEATURE_VERSION + (f"+{CONSORTIUM_VERSION}" if config.entity.enabled else ""),
        checkpoint_dir=directory,
        audit=audit,
    )
    try:
        run_federation(grid, context, settings)
    except BaseException as exc:  # SystemExit: the SuperLink went away (or the run was stopped)
        if audit is not None:
            audit.run_end(
                "stopped" if isinstance(exc, SystemExit | KeyboardInterrupt) else "failed",
                rounds_done=max(settings.sink.get("rounds") or [0]),
                weights=[],
                error=repr(exc),
            )
        raise
    if audit is not None:
        weights, served = settings.sink.get("weights", []), settings.sink.get("served_weights", [])
        done = max(settings.sink.get("rounds") or [0])
        audit.run_end("completed", rounds_done=done, weights=weights, served=served)


def wait_for_banks(grid: Grid, *, minimum: int, timeout_s: float = 300.0) -> list[int]:
    """Wait until at least `minimum` banks are connected (then a few seconds more for stragglers)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of the {minimum} banks needed (min-fit-banks) connected "
                f"within {timeout_s:.0f} s"
            )
        time.sleep(1.0)
    time.sleep(3.0)
    return list(grid.get_node_ids())
