"""A bank's entity-release ledger: composition over overlapping days, budget, achieved epsilon, the file."""

import json
import math

import pytest
from flwr.app import RecordDict

from clients import entity_round
from clients.ledger import BankLedger
from clients.release_ledger import (
    EntityBudgetError,
    ReleaseEntry,
    confirm_release,
    entity_epsilon,
    join_release,
)
from models.release_noise import composed_epsilon
from tests._helpers_release import announced as _release


def test_one_release_spends_its_calibrated_epsilon():
    entries = join_release([], _release("a"), budget=math.inf)
    assert entity_epsilon(entries, delta=1e-6) == pytest.approx(3.0, abs=0.02)


def test_releases_over_disjoint_days_compose_in_parallel():
    entries = join_release([], _release("a", start="2024-01-01", days=30), budget=math.inf)
    entries = join_release(entries, _release("b", start="2024-01-31", days=30), budget=math.inf)
    assert entity_epsilon(entries, delta=1e-6) == pytest.approx(3.0, abs=0.02)


def test_overlapping_releases_compose_with_the_rdp_accountant():
    entries = join_release([], _release("a", start="2024-01-01", days=30), budget=math.inf)
    entries = join_release(entries, _release("b", start="2024-01-20", days=30), budget=math.inf)
    z = entries[0].noise_multiplier
    both = composed_epsilon([z, z], delta=1e-6)
    assert entity_epsilon(entries, delta=1e-6) == pytest.approx(both)
    assert 3.0 < both < 6.0  # RDP composition beats adding epsilons


def test_a_release_over_the_budget_is_refused_and_not_recorded():
    entries = join_release([], _release("a"), budget=5.0)
    with pytest.raises(EntityBudgetError, match="entity-bank-epsilon"):
        join_release(entries, _release("b"), budget=4.0)
    again = join_release(entries, _release("a"), budget=3.1)  # the same release announced twice counts once
    assert len(again) == 1


def test_dropouts_raise_the_achieved_epsilon():
    entries = join_release([], _release("a", banks=10), budget=math.inf)
    confirmed = confirm_release(entries, release_id="a", contributing=5, version="v")
    assert confirmed[0].version == "v" and confirmed[0].achieved > 3.5
    assert entity_epsilon(confirmed, delta=1e-6) == pytest.approx(confirmed[0].achieved)
    full = confirm_release(entries, release_id="a", contributing=10, version="v")
    assert full[0].achieved == pytest.approx(3.0, abs=0.02)


def test_a_gaussian_release_calibrated_for_fewer_banks_keeps_its_target_when_more_send():
    entries = join_release([], _release("a", banks=10, noise_banks=8), budget=math.inf)
    assert entries[0].noise_banks == 8
    for contributing in (8, 10):  # the calibrated shares give the target; extra ones are not credited
        confirmed = confirm_release(entries, release_id="a", contributing=contributing, version="v")
        assert confirmed[0].achieved == pytest.approx(3.0, abs=0.02)
    fewer = confirm_release(entries, release_id="a", contributing=7, version="v")
    assert fewer[0].achieved > 3.1  # (the server refuses to publish this one)


def test_a_release_without_noise_has_infinite_epsilon():
    entries = join_release([], _release("a", epsilon=math.inf), budget=math.inf)
    assert math.isinf(entity_epsilon(entries, delta=1e-6))
    with pytest.raises(EntityBudgetError):
        join_release([], _release("b", epsilon=math.inf), budget=100.0)


def test_ledger_file_keeps_training_and_release_sections(tmp_path):
    ledger = BankLedger(tmp_path / "bank.json")
    state = RecordDict()
    entity_round.join(state, ledger, json.dumps(_release("a")), budget=math.inf)
    ledger.save({"dp-epsilon-spent": 0.5}, declined=False)
    entity_round.confirm(state, ledger, '{"id": "a", "contributing": 10, "version": "v1"}')
    assert ledger.load() == {"dp-epsilon-spent": 0.5}
    fresh = RecordDict()  # a restarted node reads its releases back from the file
    entries = entity_round.joined_releases(fresh, ledger)
    assert [e.release_id for e in entries] == ["a"] and entries[0].version == "v1"
    assert entity_round.spent(fresh, ledger, delta=1e-6) == pytest.approx(3.0, abs=0.02)
    assert isinstance(entries[0], ReleaseEntry)


def test_unreadable_ledger_is_refused_not_reset(tmp_path):
    path = tmp_path / "bank.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="refusing"):
        BankLedger(path).load()
    with pytest.raises(ValueError, match="refusing"):
        BankLedger(path).save_releases([])
    assert path.read_text() == "{not json"
