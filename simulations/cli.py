"""The `fedfraud` command: generate, simulate, demo, report (and the server's and banks' commands)."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from clients import bank_cli
from clients.data import DataError, parse_columns
from clients.score_cli import register as register_score
from models.config import ConfigError, load_config
from server import certs_cli, server_cli
from server.certs import CertError
from server.registry import RegistryError
from simulations.baselines import BASELINES, Method
from simulations.dataset import DataSource
from simulations.federated import EngineOptions, run_federated, without_entity
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium
from simulations.harness import simulate as run_simulate
from simulations.report import COLUMNS, LABELS, comparison_rows, render_results_dir
from simulations.vectorized import VectorizedOptions, run_vectorized

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Federated fraud detection for bank consortia."
)
console = Console(stderr=True)
out_console = Console()

Opt = typer.Option


@app.command()
def generate(
    out: Annotated[Path, Opt(help="Directory to write the bank files and manifest.json into.")],
    banks: Annotated[int, Opt(help="Number of banks.")] = 10,
    cards: Annotated[int, Opt(help="Number of cards over all banks.")] = 10_000,
    merchants: Annotated[int, Opt(help="Number of merchants (shared by all banks).")] = 2_000,
    days: Annotated[int, Opt(help="Days of transactions.")] = 60,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
    fmt: Annotated[str, Opt("--format", help="parquet or csv.")] = "parquet",
    pooled: Annotated[bool, Opt(help="Also write pooled.<format> with a bank_id column.")] = False,
) -> None:
    """Generate a synthetic consortium: one transactions file per bank plus a manifest."""
    config = GeneratorConfig(banks=banks, cards=cards, merchants=merchants, days=days, seed=seed)
    with console.status("generating transactions"):
        frame = generate_consortium(config)
        manifest = write_consortium(frame, out, fmt=fmt, pooled=pooled, config=config)
    console.print(
        f"{len(frame):,} transactions, fraud rate {frame['is_fraud'].mean():.3%}, {banks} banks -> {manifest}"
    )


ENGINES = ("flower", "vectorized", "none")


def _methods(
    engine: str,
    options: EngineOptions,
    progress: Callable[[str], None],
    *,
    entity: bool,
    vectorized: VectorizedOptions | None = None,
) -> dict[str, Method]:
    """The baselines, federated training on the chosen engine, and with consortium entity features."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    methods = dict(BASELINES)
    if engine == "vectorized" and options.checkpoint_dir is not None:
        raise ConfigError("--checkpoint-dir: the vectorized engine does not checkpoint (use --engine flower)")
    if engine in ("flower", "vectorized"):
        run = (
            functools.partial(run_federated, engine=options, progress=progress)
            if engine == "flower"
            else functools.partial(
                run_vectorized, options=vectorized or VectorizedOptions(), progress=progress
            )
        )
        methods["federated"] = lambda data, config: run(data, without_entity(config))
        if entity:
            methods["federated_entity"] = run
    return methods


def _overrides(**values: Any) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in values.items()}


@app.command()
def simulate(
    data: Annotated[Path, Opt(help="A pooled CSV/Parquet file, or a directory of bank files.")],
    out: Annotated[Path, Opt(help="Results directory.")],
    columns: Annotated[
        str | None, Opt(help="Column mapping, e.g. timestamp=TX_DATETIME,card_id=CUSTOMER_ID.")
    ] = None,
    features: Annotated[str | None, Opt(help="Feature-table mode: COL,COL,... or auto.")] = None,
    label: Annotated[str | None, Opt(help="Feature-table mode: the label column.")] = None,
    time: Annotated[str | None, Opt(help="Feature-table mode: the time column.")] = None,
    partition: Annotated[str | None, Opt(help="column:NAME | card-hash | zipf | random.")] = None,
    banks: Annotated[int | None, Opt(help="Number of banks for card-hash/zipf/random partitions.")] = None,
    seed: Annotated[int | None, Opt(help="Random seed (partition and training).")] = None,
    train_days: Annotated[int | None, Opt(help="Train window in days.")] = None,
    delay_days: Annotated[int | None, Opt(help="Label delay window in days.")] = None,
    test_days: Annotated[int | None, Opt(help="Test window in days.")] = None,
    test_start: Annotated[str | None, Opt(help="First day of the test window (YYYY-MM-DD).")] = None,
    test_fraction: Annotated[
        float | None, Opt(help="Test on the latest fraction of rows instead of days.")
    ] = None,
    model: Annotated[str | None, Opt(help="mlp or logreg.")] = None,
    epochs: Annotated[int | None, Opt(help="Epochs of the central and local baselines.")] = None,
    engine: Annotated[
        str, Opt(help="Federated engine: flower (Flower on Ray), vectorized (batched banks) or none.")
    ] = "flower",
    vectorized_chunk: Annotated[
        int, Opt(help="Vectorized engine: banks per chunk (0: from free memory).")
    ] = 0,
    rounds: Annotated[int | None, Opt(help="Federated rounds.")] = None,
    local_epochs: Annotated[int | None, Opt(help="Local epochs per round at each bank.")] = None,
    strategy: Annotated[str | None, Opt(help="fedavg, fedprox or fedadam.")] = None,
    dp: Annotated[bool | None, Opt("--dp/--no-dp", help="Record-level DP-SGD at each bank.")] = None,
    dp_epsilon: Annotated[float | None, Opt(help="Each bank's privacy budget epsilon.")] = None,
    dp_delta: Annotated[float | None, Opt(help="DP delta.")] = None,
    secagg: Annotated[bool | None, Opt("--secagg/--no-secagg", help="SecAgg+ masked aggregation.")] = None,
    central_dp: Annotated[bool | None, Opt("--central-dp/--no-central-dp", help="Client-level DP.")] = None,
    entity_features: Annotated[
        str | None, Opt(help="Federate this entity's statistics (merchant_id).")
    ] = None,
    entity_epsilon: Annotated[
        float | None, Opt(help="Epsilon of the entity release (inf: no noise).")
    ] = None,
    entity_buckets: Annotated[int | None, Opt(help="Hash buckets of the entity table.")] = None,
    entity_mechanism: Annotated[
        str | None, Opt(help="Noise of the entity release: discrete-laplace, laplace or gaussian.")
    ] = None,
    num_cpus: Annotated[float, Opt(help="CPUs per simulated bank (Ray).")] = 1.0,
    num_gpus: Annotated[float, Opt(help="GPUs per simulated bank (Ray); >0 uses the GPU.")] = 0.0,
    ray_address: Annotated[str | None, Opt(help="Attach to an existing Ray cluster (e.g. auto).")] = None,
    checkpoint_dir: Annotated[Path | None, Opt(help="Checkpoint every round here; resume from it.")] = None,
    overwrite: Annotated[bool, Opt(help="Replace an existing results directory.")] = False,
) -> None:
    """Run the experiment on research data: baselines and federated training on one split; write results."""
    config = load_config(
        _overrides(
            train_days=train_days,
            delay_days=delay_days,
            test_days=test_days,
            test_fraction=test_fraction,
            test_start=test_start,
            model=model,
            central_epochs=epochs,
            seed=seed,
            rounds=rounds,
            local_epochs=local_epochs,
            strategy=strategy,
            dp=dp,
            dp_epsilon=dp_epsilon,
            dp_delta=dp_delta,
            secagg=secagg,
            central_dp=central_dp,
            entity_features=entity_features,
            entity_epsilon=entity_epsilon,
            entity_buckets=entity_buckets,
            entity_mechanism=entity_mechanism,
        )
    )
    source = DataSource(
        path=data,
        columns=parse_columns(columns),
        features=features,
        label=label,
        time=time,
        partition=partition,
        banks=banks,
        seed=config.train.seed,
    )
    options = EngineOptions(
        num_cpus=num_cpus, num_gpus=num_gpus, ray_address=ray_address, checkpoint_dir=checkpoint_dir
    )
    with console.status("starting") as status:
        methods = _methods(
            engine,
            options,
            status.update,
            entity=config.entity.enabled,
            vectorized=VectorizedOptions(chunk=vectorized_chunk),
        )
        metrics = run_simulate(
            source, config, out, overwrite=overwrite, methods=methods, progress=status.update
        )
    _print_table(metrics)
    console.print(f"results: {out}/report.md")


@app.command()
def demo(
    out: Annotated[Path, Opt(help="Results directory.")] = Path("results/demo"),
    banks: Annotated[int, Opt(help="Number of synthetic banks.")] = 10,
    cards: Annotated[int, Opt(help="Number of cards.")] = 8_000,
    merchants: Annotated[int, Opt(help="Number of merchants.")] = 1_500,
    days: Annotated[int, Opt(help="Days of transactions.")] = 60,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
) -> None:
    """Generate a synthetic consortium, train every method on it, and print the comparison table."""
    config = load_config({"seed": seed, "entity-features": "merchant_id"})
    data = out.with_name(f"{out.name}-data")  # kept, so that `fedfraud simulate --data` can rerun on it
    with console.status("generating") as status:
        gen = GeneratorConfig(banks=banks, cards=cards, merchants=merchants, days=days, seed=seed)
        frame = generate_consortium(gen)
        shutil.rmtree(data, ignore_errors=True)
        write_consortium(frame, data, config=gen)
        status.update(f"{len(frame):,} transactions in {banks} banks ({data})")
        metrics = run_simulate(
            DataSource(path=data),
            config,
            out,
            overwrite=True,
            methods=_methods("flower", EngineOptions(), status.update, entity=True),
            progress=status.update,
        )
    _print_table(metrics)
    console.print(f"results: {out}/report.md")


@app.command()
def report(results: Annotated[Path, typer.Argument(help="A results directory.")]) -> None:
    """Re-render report.md and its plots from a results directory."""
    path = render_results_dir(results)
    console.print(f"wrote {path}")


certs_cli.register(app)
server_cli.register(app)  # `fedfraud server start|run` (server/server_cli.py)
bank_cli.register(app)  # `fedfraud bank start` (clients/bank_cli.py)


register_score(app)  # `fedfraud score` lives with the banks' side (clients/score_cli.py)


def _print_table(metrics: dict[str, Any]) -> None:
    table = Table(title="Test window, all banks")
    table.add_column("method")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for method, values in comparison_rows(metrics):
        cells = ["n/a" if values.get(k) is None else f"{values[k]:.3f}" for k, _ in COLUMNS]
        table.add_row(LABELS.get(method, method), *cells)
    out_console.print(table)


def main() -> None:
    """Entry point: run the CLI with clear one-line errors for bad input or configuration."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    torch.set_num_threads(int(os.environ.get("FEDFRAUD_TORCH_THREADS", "1")))  # small models: 1 is fastest
    for noisy in ("flwr", "ray", "matplotlib", "models", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except (
        ConfigError,
        DataError,
        CertError,
        RegistryError,
        server_cli.ServerSetupError,
        bank_cli.BankSetupError,
        FileExistsError,
        FileNotFoundError,
    ) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
