"""report.md with the comparison table and plots, rendered from a results directory."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve

logger = logging.getLogger(__name__)
COLUMNS = (
    ("ap", "AP"),
    ("roc_auc", "ROC AUC"),
    ("cp_at_100", "CP@100"),
    ("recall_at_1pct_fpr", "Recall@1%FPR"),
)
LABELS = {
    "central_pooled": "central, pooled features",
    "central_siloed": "central, siloed features",
    "local": "local (each bank alone)",
    "federated": "federated",
    "federated_entity": "federated + consortium features",
}


def _fmt(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def comparison_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(method, global metrics) for every method in the results, in a stable order."""
    methods = metrics.get("methods", {})
    order = [m for m in LABELS if m in methods] + sorted(set(methods) - set(LABELS))
    return [(m, methods[m]["global"]) for m in order]


def comparison_table(metrics: dict[str, Any]) -> str:
    """The comparison table as Markdown."""
    head = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for method, values in comparison_rows(metrics):
        cells = " | ".join(_fmt(values.get(key)) for key, _ in COLUMNS)
        lines.append(f"| {LABELS.get(method, method)} | {cells} |")
    return "\n".join(lines)


def _bank_table(metrics: dict[str, Any]) -> str:
    methods = metrics.get("methods", {})
    names = [m for m, _ in comparison_rows(metrics)]
    banks = metrics.get("banks", {})
    lines = [
        "| bank | train rows | train frauds | test frauds | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 4),
    ]
    for bank, info in banks.items():
        aps = " | ".join(_fmt(methods[m]["banks"].get(bank, {}).get("ap")) for m in names)
        lines.append(
            f"| {bank} | {info['train_rows']} | {info['train_frauds']} | {info['test_frauds']} | {aps} |"
        )
    return "\n".join(lines)


def _rounds_table(metrics: dict[str, Any]) -> str:
    lines = [
        "| method | round | AP | bank results | max epsilon | seconds | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, values in metrics.get("methods", {}).items():
        for r in values.get("rounds", []):
            eps = max(r.get("ledger", {}).values(), default=0.0)
            lines.append(
                f"| {method} | {r['round']} | {_fmt(r.get('global', {}).get('ap'))} | "
                f"{r.get('results', 'n/a')} | {eps:.2f} | {r.get('seconds', 'n/a')} | "
                f"{r.get('discarded', '')} |"
            )
    return "\n".join(lines)


def _plot_pr(predictions: dict[str, pd.DataFrame], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, pred in predictions.items():
        if pred["label"].sum() == 0:
            continue
        precision, recall, _ = precision_recall_curve(pred["label"], pred["score"])
        ax.plot(recall, precision, label=LABELS.get(method, method))
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall on the test window")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bank_ap(metrics: dict[str, Any], path: Path) -> None:
    names = [m for m, _ in comparison_rows(metrics)]
    banks = list(metrics.get("banks", {}))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(banks) * len(names) / 2), 4))
    width = 0.8 / max(len(names), 1)
    for i, method in enumerate(names):
        per_bank = metrics["methods"][method]["banks"]
        values = [per_bank.get(b, {}).get("ap") or 0.0 for b in banks]
        ax.bar(np.arange(len(banks)) + i * width, values, width, label=LABELS.get(method, method))
    ax.set_xticks(np.arange(len(banks)) + 0.4 - width / 2, banks)
    ax.set(xlabel="bank", ylabel="average precision", title="AP per bank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_rounds(metrics: dict[str, Any], out: Path) -> list[str]:
    """AP per round (federated runs against the baselines) and epsilon per round per bank."""
    runs = {m: v["rounds"] for m, v in metrics.get("methods", {}).items() if v.get("rounds")}
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rounds in runs.items():
        points = [(r["round"], r["global"]["ap"]) for r in rounds if r.get("global")]
        ax.plot(*zip(*points, strict=True), marker="o", label=LABELS.get(method, method))
    for i, (method, values) in enumerate(metrics.get("baselines", {}).items()):
        if values.get("ap") is not None:
            ax.axhline(
                values["ap"], linestyle="--", linewidth=1, color=f"C{i + 1}", label=LABELS.get(method, method)
            )
    ax.set(xlabel="round", ylabel="average precision (test window)", title="AP per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ap_per_round.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = next(iter(runs.values()))
    banks = sorted({b for r in rounds for b in r.get("ledger", {})}, key=int)
    for bank in banks:
        ax.plot(
            [r["round"] for r in rounds],
            [r.get("ledger", {}).get(bank, 0.0) for r in rounds],
            marker=".",
            label=f"bank {bank}",
        )
    ax.set(xlabel="round", ylabel="epsilon spent", title="Record-level privacy spent per bank")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "epsilon_per_round.png", dpi=110)
    plt.close(fig)
    return ["![AP per round](ap_per_round.png)", "", "![epsilon per round](epsilon_per_round.png)", ""]


def write_report(out: Path, metrics: dict[str, Any], predictions: dict[str, pd.DataFrame]) -> Path:
    """Render report.md and its plots into a results directory."""
    _plot_pr(predictions, out / "pr_curves.png")
    _plot_bank_ap(metrics, out / "ap_per_bank.png")
    round_plots = _plot_rounds(metrics, out)
    split = metrics.get("split", {})
    parts = [
        "# fedfraud results",
        "",
        f"Data: `{metrics.get('data', '')}`; {len(metrics.get('banks', {}))} banks; "
        f"features `{metrics.get('feature_version', '')}`.",
        "Split: " + ", ".join(f"{k} {v}" for k, v in split.items()),
        "",
        "## Comparison (test window, all banks)",
        "",
        comparison_table(metrics),
        "",
        "![precision-recall](pr_curves.png)",
        "",
        "## Average precision per bank",
        "",
        _bank_table(metrics),
        "",
        "![AP per bank](ap_per_bank.png)",
        "",
        *(["## Federated rounds", "", _rounds_table(metrics), "", *round_plots] if round_plots else []),
    ]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def render_results_dir(out: Path) -> Path:
    """Re-render report.md from an existing results directory (`fedfraud report DIR`)."""
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(f"{out}: no metrics.json here; is this a fedfraud results directory?")
    metrics = json.loads(metrics_path.read_text())
    predictions = {p.stem: pd.read_parquet(p) for p in sorted((out / "predictions").glob("*.parquet"))}
    return write_report(out, metrics, predictions)
