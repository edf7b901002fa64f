"""Time split: train window, label-delay window (unused), test window; or the latest fraction of rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.config import ConfigError, SplitConfig

logger = logging.getLogger(__name__)
DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class Split:
    """Boolean row masks of the train and test windows, and a description of the boundaries."""

    train: np.ndarray
    test: np.ndarray
    description: dict[str, str]
    test_start: str = ""
    """First test day (YYYY-MM-DD) of a day split, so that every bank cuts the same windows."""


def time_split(times: pd.Series, config: SplitConfig, *, test_start: str | None = None) -> Split:
    """Split rows by time: day windows for datetimes, else (or with test-fraction) the latest fraction."""
    test_start = test_start or config.test_start or None
    if config.test_fraction > 0 or not pd.api.types.is_datetime64_any_dtype(times):
        return _fraction_split(times, config.test_fraction or 0.2)
    return _day_split(times, config, test_start)


def _fraction_split(times: pd.Series, fraction: float) -> Split:
    order = np.argsort(np.asarray(times), kind="stable")
    n_test = round(len(order) * fraction)
    if n_test < 1 or n_test >= len(order):
        raise ConfigError(
            f"config key 'test-fraction': {fraction} leaves no train or no test rows out of {len(order)}"
        )
    test = np.zeros(len(order), dtype=bool)
    test[order[len(order) - n_test :]] = True
    desc = {
        "mode": "fraction",
        "test-fraction": str(fraction),
        "train-rows": str(len(order) - n_test),
        "test-rows": str(n_test),
    }
    return Split(train=~test, test=test, description=desc)


def _day_split(times: pd.Series, config: SplitConfig, test_start: str | None) -> Split:
    ts = pd.to_datetime(times)
    first_day, last_day = ts.min().normalize(), ts.max().normalize()
    if test_start is None:
        start = last_day + DAY - config.test_days * DAY
    else:
        try:
            start = pd.Timestamp(test_start).normalize()
        except ValueError:
            raise ConfigError(f"--test-start: {test_start!r} is not a date (YYYY-MM-DD)") from None
    end = start + config.test_days * DAY
    train_end = start - config.delay_days * DAY
    train_start = train_end - config.train_days * DAY
    values = ts.to_numpy()
    train = (values >= train_start.to_datetime64()) & (values < train_end.to_datetime64())
    test = (values >= start.to_datetime64()) & (values < end.to_datetime64())
    desc = {
        "mode": "days",
        "train": f"{train_start.date()} .. {(train_end - DAY).date()}",
        "delay": f"{train_end.date()} .. {(start - DAY).date()}",
        "test": f"{start.date()} .. {(end - DAY).date()}",
        "history-from": str(first_day.date()),
    }
    if not train.any():
        raise ConfigError(
            f"config key 'train-days': the train window {desc['train']} holds no rows "
            f"(data spans {first_day.date()} .. {last_day.date()})"
        )
    if not test.any():
        raise ConfigError(
            f"config key 'test-days': the test window {desc['test']} holds no rows "
            f"(data spans {first_day.date()} .. {last_day.date()})"
        )
    if train_start < first_day + 30 * DAY:
        logger.warning(
            "train window starts %s, less than 30 days after the data starts (%s): "
            "30-day window features are truncated",
            train_start.date(),
            first_day.date(),
        )
    return Split(train=train, test=test, description=desc, test_start=str(start.date()))
