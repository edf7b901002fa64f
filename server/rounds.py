"""One-off rounds of the legacy workflow (statistics, entity release, publish) on the run's grid."""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid


def run_round(grid: Grid, context: Context, strategy: Strategy, *, secagg: dict[str, Any] | None) -> None:
    """Run a single fit round of `strategy`, masked by SecAgg+ with these arguments when given."""
    fit = SecAggPlusWorkflow(**secagg) if secagg is not None else None
    workflow = DefaultWorkflow(fit_workflow=fit, evaluate_workflow=lambda g, c: None)
    workflow(grid, LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy))
