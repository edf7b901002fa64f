import numpy as np
import pandas as pd
import pytest

from models.config import ConfigError, SplitConfig
from models.split import time_split
from simulations.partition import partition_banks


def _times(days=40, per_day=10):
    base = pd.Timestamp("2024-01-01")
    return pd.Series([base + pd.Timedelta(days=d, hours=h) for d in range(days) for h in range(per_day)])


def test_day_split_windows_end_on_last_day():
    times = _times()
    split = time_split(
        times, SplitConfig(train_days=7, delay_days=7, test_days=7, test_fraction=0.0, test_start="")
    )
    days = (times - times.min()).dt.days.to_numpy()
    assert set(days[split.test]) == set(range(33, 40))
    assert set(days[split.train]) == set(range(19, 26))
    assert not (split.train & split.test).any()
    assert split.description["test"] == "2024-02-03 .. 2024-02-09"


def test_day_split_with_test_start():
    times = _times()
    split = time_split(times, SplitConfig(5, 2, 3, 0.0, ""), test_start="2024-01-20")
    days = (times - times.min()).dt.days.to_numpy()
    assert set(days[split.test]) == {19, 20, 21}
    assert set(days[split.train]) == set(range(12, 17))


def test_day_split_refuses_empty_windows():
    times = _times(days=10)
    with pytest.raises(ConfigError, match="'train-days'"):
        time_split(times, SplitConfig(7, 7, 7, 0.0, ""))
    with pytest.raises(ConfigError, match="test-start"):
        time_split(times, SplitConfig(1, 1, 1, 0.0, ""), test_start="not a date")


def test_fraction_split_takes_latest_rows():
    times = pd.Series(np.arange(100, 0, -1).astype(float))
    split = time_split(times, SplitConfig(7, 7, 7, 0.25, ""))
    assert split.test.sum() == 25
    assert times[split.test].min() > times[split.train].max()


def test_numeric_times_default_to_a_fraction():
    split = time_split(pd.Series(np.arange(50.0)), SplitConfig(7, 7, 7, 0.0, ""))
    assert split.test.sum() == 10


def _cards(n_cards=400, per_card=3):
    return pd.DataFrame(
        {
            "card_id": np.repeat(np.arange(n_cards), per_card),
            "bank": np.repeat(np.arange(n_cards) % 3, per_card),
        }
    )


@pytest.mark.parametrize("scheme", ["card-hash", "zipf", "random"])
def test_schemes_keep_cards_in_one_bank(scheme):
    frame = _cards()
    banks = partition_banks(frame, scheme, banks=5, seed=1)
    per_card = pd.Series(banks).groupby(frame["card_id"]).nunique()
    assert (per_card == 1).all()
    assert set(banks) <= set(range(5))
    assert np.array_equal(banks, partition_banks(frame, scheme, banks=5, seed=1))


def test_zipf_sizes_are_unequal():
    frame = _cards(n_cards=5000, per_card=1)
    sizes = np.bincount(partition_banks(frame, "zipf", banks=5, seed=0), minlength=5)
    assert sizes[0] > 3 * sizes[4] > 0


def test_column_partition_and_errors():
    frame = pd.DataFrame({"card_id": [1, 2, 3], "region": ["b", "a", "b"]})
    assert partition_banks(frame, "column:region", banks=None).tolist() == [1, 0, 1]
    with pytest.raises(ConfigError, match="'nope'"):
        partition_banks(frame, "column:nope", banks=None)
    with pytest.raises(ConfigError, match="--banks"):
        partition_banks(frame, "zipf", banks=None)
    with pytest.raises(ConfigError, match="hash-it"):
        partition_banks(frame, "hash-it", banks=3)


def test_random_partition_of_rows_without_cards():
    frame = pd.DataFrame({"x": np.arange(300)})
    banks = partition_banks(frame, "random", banks=3, seed=0)
    assert len(set(banks)) == 3
