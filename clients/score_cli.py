"""`fedfraud score`: a bank scores its own transactions file with a model package."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from clients.data import parse_columns
from clients.score_file import score_file
from clients.scoring import ENGINES, KEY_ENV
from models.package import PackageError, load_package

logger = logging.getLogger(__name__)
console = Console(stderr=True)
Opt = typer.Option


class _StageBar(Progress):
    """A transient progress bar with one task per stage (reading, scoring, explaining)."""

    def __init__(self) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        super().__init__(*columns, console=console, transient=True)
        self.stages: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Set a stage's progress (its task is added on first use)."""
        if stage not in self.stages:
            self.stages[stage] = self.add_task(stage, total=total)
        self.update(self.stages[stage], completed=done)


def score(  # noqa: PLR0917 - a typer command: one parameter per flag
    model: Annotated[Path, Opt(help="Model package directory (a results directory's model/).")],
    data: Annotated[Path, Opt(help="Transactions file (CSV/Parquet), history included for the windows.")],
    out: Annotated[Path, Opt(help="Output file (.csv or .parquet): transaction_id, score, decision.")],
    columns: Annotated[
        str | None, Opt(help="Column mapping, e.g. timestamp=TX_DATETIME,card_id=CUSTOMER_ID.")
    ] = None,
    since: Annotated[
        str | None, Opt(help="Write only rows at or after this date (earlier rows are history).")
    ] = None,
    engine: Annotated[str, Opt(help="onnx (onnxruntime) or torch.")] = "onnx",
    threads: Annotated[int | None, Opt(help="Scoring threads (default: all CPUs available).")] = None,
    explain: Annotated[int, Opt(help="Add the top N contributing features in plain words (0: off).")] = 0,
    entity_key: Annotated[
        str | None, Opt(help=f"Consortium key (hex) for consortium features; or set {KEY_ENV}.")
    ] = None,
) -> None:
    """Score a bank's transactions with a model package: a score and a decision at the package's threshold."""
    if engine not in ENGINES:
        raise typer.BadParameter(f"{engine!r} is not one of {', '.join(ENGINES)}", param_hint="--engine")
    if explain < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--explain")
    if engine == "torch" and threads:
        torch.set_num_threads(threads)
    try:
        package = load_package(model)
        with _StageBar() as bar:
            summary = score_file(
                package,
                data,
                out,
                columns=parse_columns(columns),
                engine=engine,
                threads=threads,
                since=since,
                explain=explain,
                entity_key=entity_key,
                progress=bar,
            )
    except PackageError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(
        f"{summary.rows_scored:,} of {summary.rows_read:,} rows scored, {summary.flagged:,} flagged "
        f"(score >= {summary.threshold:.4g}, target FPR {package.threshold.target_fpr:.2%}) -> {summary.out}"
    )


def register(app: typer.Typer) -> None:
    """Add the `score` command to the fedfraud app."""
    app.command(name="score")(score)
