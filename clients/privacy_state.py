"""Argument checks and the persisted DP-SGD state of `clients.privacy` / `clients.dpsgd`.

`_restore` reads back what `DPSGD.state()` wrote into the ClientApp's `context.state`: it refuses a state
whose budget, delta or accountant differ from those requested, or that is incomplete or malformed
(ValueError naming the key).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

History = list[tuple[float, float, int]]
_SAME_RTOL = 1e-12
_HISTORY_KEYS = ("dp-history-sigma", "dp-history-rate", "dp-history-steps")
_RESTORED_KEYS = ("dp-sigma", "dp-epsilon", "dp-delta", "dp-accountant", *_HISTORY_KEYS)


def _check_count(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_number(name: str, value: float, *, upper: float = math.inf, closed: bool = False) -> float:
    ok = _finite(value) and value > 0 and (value <= upper if closed else value < upper)
    if not ok:
        raise ValueError(
            f"{name} must be a finite number in (0, {upper}{']' if closed else ')'}, got {value!r}"
        )
    return float(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _restore(
    state: Mapping[str, Any], *, epsilon: float, delta: float, accountant: str
) -> tuple[float, History] | None:
    """Return (sigma, history) from a persisted state, None if it holds no DP-SGD state."""
    present = [k for k in _RESTORED_KEYS if k in state]
    if not present:
        return None
    missing = [k for k in _RESTORED_KEYS if k not in state]
    if missing:
        raise ValueError(f"privacy state key '{missing[0]}' is missing (state has {', '.join(present)})")
    for key, expected in (("dp-epsilon", epsilon), ("dp-delta", delta)):
        stored = state[key]
        if not _finite(stored) or not math.isclose(stored, expected, rel_tol=_SAME_RTOL):
            raise ValueError(
                f"privacy state key '{key}' is {stored!r} but {expected!r} was requested: "
                "a bank cannot change its privacy budget mid-run (start a new run instead)"
            )
    if state["dp-accountant"] != accountant:
        raise ValueError(
            f"privacy state key 'dp-accountant' is {state['dp-accountant']!r} but "
            f"{accountant!r} was requested"
        )
    sigma = state["dp-sigma"]
    if not _finite(sigma) or sigma <= 0:
        raise ValueError(f"privacy state key 'dp-sigma' must be a positive number, got {sigma!r}")
    sigmas, rates, steps = (list(state[k]) for k in _HISTORY_KEYS)
    if not len(sigmas) == len(rates) == len(steps):
        raise ValueError(
            "privacy state keys 'dp-history-sigma', 'dp-history-rate', 'dp-history-steps' "
            f"have different lengths ({len(sigmas)}, {len(rates)}, {len(steps)})"
        )
    history = []
    for s, q, k in zip(sigmas, rates, steps, strict=True):
        if not (
            _finite(s)
            and s > 0
            and _finite(q)
            and 0 < q <= 1
            and isinstance(k, int)
            and not isinstance(k, bool)
            and k > 0
        ):
            raise ValueError(f"privacy state key 'dp-history-*' has an invalid entry ({s!r}, {q!r}, {k!r})")
        history.append((float(s), float(q), int(k)))
    return float(sigma), history
