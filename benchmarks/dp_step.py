"""Time one DP-SGD step against a plain step, per grad-sample mode, and check each against Opacus hooks.

    .venv/bin/python benchmarks/dp_step.py [--batch 256] [--features 20] [--rounds 7] [--steps 40]
                                           [--threads N]

Model: `build_model("mlp", features)` (20 -> 64 -> 64 -> 1), Adam, weighted BCE; one fixed batch of
`--batch` rows, so every variant does the same work. A step is zero_grad, forward, loss, backward,
optimizer.step() (clipping, noise, accountant and budget hooks included). Modes "hooks", "ew",
"functorch" and "fused" run through `DPSGD.wrap`, the production path; Opacus' "ghost" (fast gradient
clipping, which needs its wrapped criterion and a second backward pass) through `PrivacyEngine` directly.
Variants are interleaved over `--rounds` rounds of `--steps` timed steps; the table shows the median of the
per-round mean step times, wall-clock and CPU time of this thread. With one torch thread (the default) the
thread's CPU time is all the work and is less disturbed by other jobs on a shared machine, so the final
`dp/plain ratio` line uses it. "max |diff|" compares each mode's privatised gradient (clipped per-sample
sum / expected batch size, noise 0, one step) with the hooks path's.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from opacus import PrivacyEngine
from torch import nn

from clients.privacy import DPSGD
from clients.privacy_opacus import DEFAULT_GRAD_SAMPLE_MODE, make_private
from models.nets import build_model
from models.training import make_loader, make_optimizer

MODES = ("hooks", "ew", "functorch", "ghost", "fused")
POS_WEIGHT = 5.0
N_BATCHES = 40  # rows = batch * N_BATCHES: sample rate 1/40


def _data(batch: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(batch * N_BATCHES, features)).astype(np.float32)
    y = (rng.random(batch * N_BATCHES) < 0.2).astype(np.float32)
    return x, y


def _bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(POS_WEIGHT))


def _ghost(x: np.ndarray, y: np.ndarray, batch: int, features: int, sigma: float) -> tuple:
    """Opacus' ghost clipping: (model, optimizer, wrapped criterion)."""
    model = build_model("mlp", features, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, crit, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=make_optimizer(model, lr=1e-3),
            data_loader=make_loader(x, y, batch_size=batch, seed=0),
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            criterion=nn.BCEWithLogitsLoss(pos_weight=torch.tensor(POS_WEIGHT)),
            grad_sample_mode="ghost",
        )
    return gsm, opt, crit


def make_step(mode: str, x: np.ndarray, y: np.ndarray, batch: int, features: int) -> Callable[[], None]:
    """Return a closure doing one training step of `mode` ('plain' or a grad-sample mode) on one batch."""
    xb, yb = torch.from_numpy(x[:batch]), torch.from_numpy(y[:batch])
    if mode == "ghost":
        model, opt, crit = _ghost(x, y, batch, features, sigma=1.0)

        def ghost_step() -> None:
            opt.zero_grad(set_to_none=True)
            crit(model(xb), yb).backward()
            opt.step()

        return ghost_step
    model = build_model("mlp", features, seed=0)
    opt = make_optimizer(model, lr=1e-3)
    if mode != "plain":
        dp = DPSGD(
            epsilon=8.0,
            delta=1e-5,
            max_grad_norm=1.0,
            sample_rate=1 / N_BATCHES,
            planned_steps=20_000,
            grad_sample_mode=mode,
        )
        model, opt, _ = dp.wrap(model, opt, make_loader(x, y, batch_size=batch, seed=0))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _bce(model(xb), yb).backward()
        opt.step()

    return step


def clipped_sum(mode: str, x: np.ndarray, y: np.ndarray, batch: int, features: int) -> list[torch.Tensor]:
    """Return the privatised gradient of one batch with noise 0 (clipped sum / expected batch size)."""
    xb, yb = torch.from_numpy(x[:batch]), torch.from_numpy(y[:batch])
    if mode == "ghost":
        model, opt, crit = _ghost(x, y, batch, features, sigma=0.0)
        loss = crit(model(xb), yb)
    else:
        model = build_model("mlp", features, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, _ = make_private(
                PrivacyEngine(accountant="rdp"),
                module=model,
                optimizer=make_optimizer(model, lr=1e-3),
                data_loader=make_loader(x, y, batch_size=batch, seed=0),
                noise_multiplier=0.0,
                max_grad_norm=1.0,
                grad_sample_mode=mode,
            )
        loss = _bce(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.pre_step()
    return [p.grad.detach().clone() for p in opt.params]


def main() -> None:
    """Run the benchmark and print the table and the chosen mode's dp/plain ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus' secure-RNG and alpha-range notes
    torch.set_num_threads(args.threads)
    x, y = _data(args.batch, args.features)
    reference = clipped_sum("hooks", x, y, args.batch, args.features)
    diffs = {
        m: max(
            float((a - b).abs().max())
            for a, b in zip(reference, clipped_sum(m, x, y, args.batch, args.features), strict=True)
        )
        for m in MODES
    }
    steps = {m: make_step(m, x, y, args.batch, args.features) for m in ("plain", *MODES)}
    wall, cpu = _time(steps, rounds=args.rounds, n=args.steps)
    print(
        f"DP step at batch {args.batch}, MLP {args.features}-64-64-1, Adam, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'mode':<11}{'wall ms':>9}{'x plain':>9}{'cpu ms':>9}{'x plain':>9}{'max |diff| vs hooks':>21}")
    for mode in steps:
        diff = f"{diffs[mode]:.1e}" if mode in diffs else "-"
        chosen = "  <- default" if mode == DEFAULT_GRAD_SAMPLE_MODE else ""
        print(
            f"{mode:<11}{wall[mode]:>9.3f}{wall[mode] / wall['plain']:>9.2f}{cpu[mode]:>9.3f}"
            f"{cpu[mode] / cpu['plain']:>9.2f}{diff:>21}{chosen}"
        )
    print(f"dp/plain ratio: {cpu[DEFAULT_GRAD_SAMPLE_MODE] / cpu['plain']:.2f}")


def _time(steps: dict[str, Callable[[], None]], *, rounds: int, n: int) -> tuple[dict, dict]:
    """Return the median per-round mean step time (ms), wall-clock and thread CPU, of each variant."""
    wall: dict[str, list[float]] = {m: [] for m in steps}
    cpu: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            for _ in range(5):
                step()
            w, c = time.perf_counter(), time.thread_time()
            for _ in range(n):
                step()
            cpu[mode].append((time.thread_time() - c) / n * 1e3)
            wall[mode].append((time.perf_counter() - w) / n * 1e3)
    return (
        {m: statistics.median(t) for m, t in wall.items()},
        {m: statistics.median(t) for m, t in cpu.items()},
    )


if __name__ == "__main__":
    main()
