"""Fraud scenarios of the synthetic consortium (each relabels everyday rows or adds labelled ones).

`World` holds the drawn population (merchants, cards) and `Batch` a block of rows, both built by
`simulations.generate`. Scenario codes index `SCENARIOS`: code 0 is a legitimate transaction, any other
code is fraud.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from simulations.generate import GeneratorConfig

logger = logging.getLogger(__name__)

SCENARIOS = ("none", "compromised_merchant", "compromised_card", "card_testing", "high_amount")
NONE, COMPROMISED_MERCHANT, COMPROMISED_CARD, CARD_TESTING, HIGH_AMOUNT = range(len(SCENARIOS))
DAY = 86_400
# Share of a day's transactions in each hour: a daytime peak (late morning to evening), few at night.
HOUR_WEIGHTS = np.array(
    [8, 5, 3, 2.5, 3, 6, 15, 30, 45, 55, 60, 65, 75, 70, 65, 65, 70, 75, 75, 70, 60, 45, 30, 18]
)
HOUR_P = HOUR_WEIGHTS / HOUR_WEIGHTS.sum()
NIGHT_HOURS = 6
# Compromised merchants are small shops (skimmers, breached tills), not chains: this many transactions a
# month over all banks, so that each bank sees only a handful of them and only the consortium sees the rate.
SMALL_SHOP_MONTHLY = (10.0, 80.0)
CARD_TESTING_CATEGORIES = (5, 6)  # online and digital goods (category indices, see generate.CATEGORY_SHARE)
TYPICAL_AMOUNT = 40.0  # median everyday amount of a card with scale 1
SPREE_AMOUNT_FACTOR = 5.0  # spree amounts: this many times the card's typical amount (median)
SPREE_NIGHT_SHARE = 0.45  # share of spree transactions moved to the night
HIGH_AMOUNT_RANGE = (1500.0, 10_000.0)  # log-uniform amounts of high-amount frauds


@dataclass(frozen=True)
class World:
    """The population: merchant popularity and category, card bank and personal amount scale."""

    merchant_p: np.ndarray  # popularity, sums to 1
    merchant_category: np.ndarray
    card_bank: np.ndarray
    card_scale: np.ndarray  # a card's personal amount multiplier (around 1)


@dataclass(frozen=True)
class Batch:
    """Rows of transactions: card and merchant indices, seconds since start, amount, scenario code."""

    card: np.ndarray
    merchant: np.ndarray
    second: np.ndarray
    amount: np.ndarray
    scenario: np.ndarray

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Return the rows of several batches, in order."""
        return Batch(
            *(
                np.concatenate([getattr(b, name) for b in batches])
                for name in ("card", "merchant", "second", "amount", "scenario")
            )
        )


def time_of_day(rng: np.random.Generator, n: int, night_share: float = 0.0) -> np.ndarray:
    """Return seconds within the day: daytime-peaked hours, with `night_share` of rows moved to 0-6 h."""
    hour = rng.choice(HOUR_P.size, size=n, p=HOUR_P)
    night = rng.random(n) < night_share
    hour[night] = rng.integers(0, NIGHT_HOURS, size=int(night.sum()))
    return hour.astype(np.int64) * 3600 + rng.integers(0, 3600, size=n)


def _event_count(rng: np.random.Generator, expected: float) -> int:
    """Poisson number of events, at least one when the scenario is enabled (small data still has it)."""
    if expected <= 0:
        return 0
    return max(1, int(rng.poisson(expected)))


def _fraud_merchants(
    rng: np.random.Generator, world: World, n: int, pool: np.ndarray | None = None
) -> np.ndarray:
    """Draw merchants for fraud rows by popularity, from `pool` (all merchants when absent or empty)."""
    pool = np.arange(world.merchant_p.size) if pool is None or pool.size == 0 else pool
    weight = world.merchant_p[pool]
    return rng.choice(pool, size=n, p=weight / weight.sum())


def _cents(amount: np.ndarray) -> np.ndarray:
    return np.maximum(np.round(amount, 2), 0.01)


def compromise_merchants(
    rng: np.random.Generator, batch: Batch, n_merchants: int, config: GeneratorConfig
) -> int:
    """Relabel a share of all transactions at merchants compromised for weeks; return how many merchants.

    Small shops are drawn in random order until the expected number of frauds reaches
    `merchant_fraud_rate` of the rows; frauds are ordinary rows (cards of every bank, usual
    amounts and hours) so that only the merchant's consortium-wide fraud rate reveals them.
    """
    days = config.days
    day = batch.second // DAY
    counts = np.bincount(batch.merchant * days + day, minlength=n_merchants * days).reshape(n_merchants, days)
    cumulative = np.zeros((n_merchants, days + 1))
    cumulative[:, 1:] = counts.cumsum(axis=1)
    volume = cumulative[:, -1]
    monthly = volume * 30.0 / days
    small = np.flatnonzero((monthly >= SMALL_SHOP_MONTHLY[0]) & (monthly <= SMALL_SHOP_MONTHLY[1]))
    order = rng.permutation(small if small.size else np.flatnonzero(volume > 0))
    length = rng.integers(config.compromise_min_days, config.compromise_max_days + 1, size=order.size)
    start = rng.integers(-length, days)  # as many compromises active on every day of the period
    share = rng.uniform(config.compromise_min_share, config.compromise_max_share, size=order.size)
    lo, hi = np.clip(start, 0, days), np.clip(start + length, 0, days)
    expected = (cumulative[order, hi] - cumulative[order, lo]) * share
    target = config.merchant_fraud_rate * batch.card.size
    taken = 0 if target <= 0 else min(order.size, int(np.searchsorted(np.cumsum(expected), target)) + 1)
    chosen = order[:taken]
    first, last = np.zeros(n_merchants, np.int64), np.zeros(n_merchants, np.int64)
    rate = np.zeros(n_merchants)
    first[chosen], last[chosen], rate[chosen] = lo[:taken], hi[:taken], share[:taken]
    m = batch.merchant
    fraud = (day >= first[m]) & (day < last[m]) & (rng.random(m.size) < rate[m])
    batch.scenario[fraud] = COMPROMISED_MERCHANT
    logger.info("compromised %d of %d merchants: %d frauds", taken, n_merchants, int(fraud.sum()))
    return taken


def compromised_cards(rng: np.random.Generator, world: World, config: GeneratorConfig) -> Batch:
    """Spend sprees of stolen card details: 1-3 days, high amounts, unfamiliar merchants, often at night."""
    n_events = _event_count(rng, config.card_compromise_rate * world.card_bank.size * config.days)
    card = rng.integers(0, world.card_bank.size, size=n_events)
    begin = rng.random(n_events) * max(config.days - 1, 0)
    length = rng.uniform(1.0, 3.0, size=n_events)
    per_event = 3 + rng.poisson(4.0, size=n_events)
    event = np.repeat(np.arange(n_events), per_event)
    n = event.size
    day = np.minimum(np.floor(begin[event] + rng.random(n) * length[event]), config.days - 1).astype(np.int64)
    second = day * DAY + time_of_day(rng, n, night_share=SPREE_NIGHT_SHARE)
    merchant = _fraud_merchants(rng, world, n)
    amount = (
        TYPICAL_AMOUNT
        * world.card_scale[card[event]]
        * rng.lognormal(np.log(SPREE_AMOUNT_FACTOR), 0.6, size=n)
    )
    return Batch(card[event], merchant, second, _cents(amount), np.full(n, COMPROMISED_CARD, np.int8))


def _segment_cumsum(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cumulative sums restarted at each segment (segments are consecutive runs of `sizes` rows)."""
    total = np.cumsum(values)
    starts = np.cumsum(sizes) - sizes
    return total - np.repeat(total[starts] - values[starts], sizes)


def card_testing(rng: np.random.Generator, world: World, config: GeneratorConfig) -> Batch:
    """Bursts of many small amounts (0.50-5.00) by one stolen card at 1-3 online merchants, minutes apart."""
    n_bursts = _event_count(rng, config.card_testing_rate * world.card_bank.size * config.days)
    card = rng.integers(0, world.card_bank.size, size=n_bursts)
    size = rng.integers(8, 41, size=n_bursts)
    burst = np.repeat(np.arange(n_bursts), size)
    gap = np.exp(rng.uniform(np.log(15.0), np.log(600.0), size=n_bursts))  # mean seconds between tries
    offsets = _segment_cumsum(rng.exponential(gap[burst]), size)
    start = rng.random(n_bursts) * config.days * DAY
    second = np.minimum(start[burst] + offsets, config.days * DAY - 1).astype(np.int64)
    online = np.flatnonzero(np.isin(world.merchant_category, CARD_TESTING_CATEGORIES))
    targets = _fraud_merchants(rng, world, n_bursts * 3, online).reshape(n_bursts, 3)
    slot = rng.integers(0, rng.integers(1, 4, size=n_bursts)[burst])
    amount = rng.uniform(0.5, 5.0, size=burst.size)
    return Batch(
        card[burst], targets[burst, slot], second, _cents(amount), np.full(burst.size, CARD_TESTING, np.int8)
    )


def high_amount(rng: np.random.Generator, world: World, config: GeneratorConfig, n_rows: int) -> Batch:
    """Isolated single transactions with very large amounts (about 1,500-10,000) at ordinary hours."""
    n = _event_count(rng, config.high_amount_rate * n_rows)
    card = rng.integers(0, world.card_bank.size, size=n)
    merchant = _fraud_merchants(rng, world, n)
    day = rng.integers(0, config.days, size=n)
    second = day * DAY + time_of_day(rng, n)
    low, high = np.log(HIGH_AMOUNT_RANGE)
    amount = np.exp(rng.uniform(float(low), float(high), size=n))
    return Batch(card, merchant, second, _cents(amount), np.full(n, HIGH_AMOUNT, np.int8))
