"""Server strategies: guarded FedAvg / FedProx / FedAdam, and the secure mean of the statistics round.

The guard discards an aggregate that is non-finite or beyond the clipping bound and records each round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from models.config import FedFraudConfig
from models.federation import (
    CLIPPING_RANGE,
    EVAL_PREFIX,
    KEY_EVALUATE,
    KEY_ROUND,
    KEY_SPEC,
    REPORT_KEYS,
    TASK,
    TASK_PUBLISH,
    TASK_TRAIN,
)

logger = logging.getLogger(__name__)
RoundHook = Callable[[int, dict[str, Any]], None]
BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def check_aggregate(arrays: list[np.ndarray], reference: list[np.ndarray]) -> str | None:
    """Why an aggregate must be discarded (non-finite, mis-shaped, beyond the clipping bound), or None."""
    if [a.shape for a in arrays] != [r.shape for r in reference]:
        return "shapes differ from the model"
    if not all(np.isfinite(a).all() for a in arrays):
        return "non-finite values (e.g. every bank declined)"
    worst = max(float(np.abs(a).max(initial=0.0)) for a in arrays)
    if worst > CLIPPING_RANGE:
        return f"|value| {worst:.2f} beyond the clipping bound {CLIPPING_RANGE}"
    return None


class GuardedMixin:
    """Discards an aggregate that fails `check_aggregate` (the global model stays) and reports each round."""

    on_round: RoundHook
    round_offset: int
    last_round: int
    evaluate_in_fit: bool
    current: list[np.ndarray]
    _started: float

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample banks and stamp the real round number (resumed runs continue their count)."""
        self._started = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate (under SecAgg+ every result already carries the masked mean) and guard the result."""
        round_no = server_round + self.round_offset
        info: dict[str, Any] = {"round": round_no, "results": len(results), "failures": len(failures)}
        info.update(self._reports(round_no, results))
        if not results:
            info["discarded"] = "no results (SecAgg+ threshold not met or every bank failed)"
            self.on_round(round_no, info)
            return None, {}
        params, metrics = super().aggregate_fit(server_round, results, failures)  # type: ignore[misc]
        reason = (
            "no aggregate"
            if params is None
            else check_aggregate(parameters_to_ndarrays(params), self.current)
        )
        if reason is not None:
            logger.error("round %d: aggregate discarded, the global model is kept: %s", round_no, reason)
            info["discarded"] = reason
            self.on_round(round_no, info)
            return None, {}
        self.current = parameters_to_ndarrays(params)
        info["seconds"] = round(time.perf_counter() - self._started, 3)
        self.on_round(round_no, {**info, "weights": self.current})
        return params, metrics

    def _reports(self, round_no: int, results: list[tuple[ClientProxy, FitRes]]) -> dict[str, Any]:
        """Each bank's privacy report (`REPORT_KEYS`); its score of the previous model goes to that round."""
        privacy, scored = {}, {}
        for _, res in results:
            bank = str(int(res.metrics.get("bank", -1)))
            privacy[bank] = {k: res.metrics[k] for k in REPORT_KEYS if k in res.metrics}
            prev = {k[len(EVAL_PREFIX) :]: v for k, v in res.metrics.items() if k.startswith(EVAL_PREFIX)}
            if prev:
                scored[bank] = {**prev, "bank": privacy[bank].get("bank", -1)}
        if scored and round_no > 1:
            self.on_round(round_no - 1, {"banks": scored, "evaluate_failures": 0})
        return {"banks": privacy} if privacy else {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Close the round's record; evaluate only the last round when the banks score in the next fit."""
        round_no = server_round + self.round_offset
        self.on_round(round_no, {"closed": True})
        if self.evaluate_in_fit and round_no < self.last_round:
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Collect each bank's test metrics and epsilon for the round's record."""
        banks = {
            str(int(r.metrics.get("bank", -1))): {**r.metrics, "loss": r.loss, "examples": r.num_examples}
            for _, r in results
        }
        self.on_round(server_round + self.round_offset, {"banks": banks, "evaluate_failures": len(failures)})
        return super().aggregate_evaluate(server_round, results, failures)  # type: ignore[misc]


def build_strategy(
    config: FedFraudConfig,
    initial: list[np.ndarray],
    *,
    n_banks: int,
    spec_json: str,
    on_round: RoundHook,
    round_offset: int = 0,
) -> Strategy:
    """The configured strategy (FedAvg, FedProx or FedAdam) with the guard, round offset and fit config."""
    fed = config.federation
    base = BASES[fed.strategy]
    cls = type(f"Guarded{base.__name__}", (GuardedMixin, base), {})
    per_round = max(1, round(fed.fraction_fit * n_banks))

    def fit_config(server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {TASK: TASK_TRAIN, KEY_ROUND: server_round + round_offset}
        config[KEY_SPEC] = spec_json
        if fed.evaluate_in_fit and server_round + round_offset > 1:  # the previous round's model (after a
            config[KEY_EVALUATE] = True  # resume too: the checkpoint's round may lack its metrics)
        return config

    kwargs: dict[str, Any] = {
        "fraction_fit": fed.fraction_fit,
        "fraction_evaluate": 1.0,
        "min_fit_clients": min(max(fed.min_fit_banks, per_round), n_banks),
        "min_evaluate_clients": n_banks,
        "min_available_clients": n_banks,
        "initial_parameters": ndarrays_to_parameters(initial),
        "on_fit_config_fn": fit_config,
        "on_evaluate_config_fn": lambda r: {KEY_SPEC: spec_json},
        "fit_metrics_aggregation_fn": lambda _: {},
        "evaluate_metrics_aggregation_fn": lambda _: {},
    }
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    if fed.strategy == "fedadam":
        kwargs.update(eta=fed.server_lr, eta_l=config.train.lr)
    strategy = cls(**kwargs)
    strategy.on_round, strategy.round_offset, strategy.current = on_round, round_offset, list(initial)
    strategy.last_round, strategy.evaluate_in_fit = fed.rounds, fed.evaluate_in_fit
    return strategy


class RecordedClientSideDP(DifferentialPrivacyClientSideFixedClipping):
    """Client-level DP whose round record (checkpoint, served model) is the noised model of the next round."""

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Aggregate and add noise, then report the noised weights (the inner, un-noised report is held)."""
        inner: Any = self.strategy  # a GuardedMixin strategy
        hook = inner.on_round
        held: dict[str, Any] = {}
        round_no = server_round + inner.round_offset

        def hold(number: int, info: dict[str, Any]) -> None:  # this round's report waits for the noise
            if number == round_no:
                held.update(info=info)
            else:
                hook(number, info)

        inner.on_round = hold
        try:
            params, metrics = super().aggregate_fit(server_round, results, failures)
        finally:
            inner.on_round = hook
        info = dict(held.get("info") or {"round": round_no, "results": len(results)})
        info["failures"] = len(failures)
        if params is None:
            info.pop("weights", None)
            info.setdefault("discarded", "client-level DP skips a round with failures")
        else:
            inner.current = parameters_to_ndarrays(params)
            info["weights"] = inner.current
        hook(round_no, info)
        return params, metrics


class SecureMeanStrategy(FedAvg):
    """One fit round (a task, its payload) whose aggregate is the weighted mean of the banks' vectors.

    Under SecAgg+ every result already carries that mean: the server never holds a single bank's vector.
    The mean lands in `sink[key]`, the number of answering banks in `sink[key + "_results"]`; `publish`
    rounds (the payload goes out, nothing comes back) keep nothing.
    """

    def __init__(
        self,
        *,
        payload: list[np.ndarray],
        config: dict[str, Scalar],
        n_banks: int,
        sink: dict[str, Any],
        key: str,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n_banks,
            min_available_clients=n_banks,
            initial_parameters=ndarrays_to_parameters(payload),
            fit_metrics_aggregation_fn=lambda _: {},
        )
        self.config, self.sink, self.key = config, sink, key

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the payload with the round's task."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        return [(client, FitIns(parameters, dict(self.config))) for client, _ in pairs]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the mean of the banks' vectors (under SecAgg+ the only thing the server ever sees)."""
        self.sink[f"{self.key}_results"] = len(results)
        if self.config.get(TASK) == TASK_PUBLISH or not results:
            return None, {}
        params, _ = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.sink[self.key] = parameters_to_ndarrays(params)[0]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No evaluation in these rounds."""
        return []
