"""Deployment end to end: a real SuperLink with TLS and node authentication, banks' SuperNodes on 127.0.0.1.

One consortium per module (CA, server certificate, registered bank keys, SuperLink); each test starts its
banks with fresh ledgers (a bank's ledger spans its runs: a spent budget makes it decline). `pytest -m
deployment` runs them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clients.sent_log import read_sent_log
from server.audit import model_hash
from server.checkpoint import load_checkpoint
from server.keyinfo import key_fingerprint
from simulations.generate import GeneratorConfig, generate_consortium, write_consortium
from tests._deploy import Consortium, ledger, wait_for

pytestmark = pytest.mark.deployment
BANKS = ["bank0", "bank1", "bank2", "bank3"]
RUN_TIMEOUT = 420


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy")
    gen = GeneratorConfig(banks=4, cards=600, merchants=150, days=30, seed=1)
    write_consortium(generate_consortium(gen), root / "data", config=gen)
    deployment = Consortium(root=root, data=root / "data")
    try:
        deployment.make_certs([*BANKS, "stranger", "revoked", "connected"])
        deployment.start_server()
        for bank in [*BANKS, "revoked", "connected"]:
            deployment.register(bank)
        from server import registry  # noqa: PLC0415

        registry.revoke_bank(
            deployment.node_ids["revoked"], connection="fedfraud", flwr_home=deployment.flwr_home
        )
        yield deployment
    finally:
        deployment.close()


def _finish(proc, timeout: float = RUN_TIMEOUT) -> None:
    code = proc.wait(timeout=timeout)
    assert code == 0, proc.text()[-4000:]


def _events(events, name):
    return [e for e in events if e["event"] == name]


def test_two_rounds_over_tls_with_secagg_and_dp(consortium: Consortium):
    since = len(consortium.audit())
    with consortium.banks(BANKS[:3], "tls"):
        entity = "entity-features='merchant_id' entity-buckets=1024 entity-start='2024-01-01' entity-days=30"
        _finish(consortium.run("tls", rounds=2, run_config=f"min-fit-banks=3 {entity}"))
    events = consortium.audit(since)
    start = _events(events, "run_start")[0]
    assert start["config"]["rounds"] == 2 and start["config"]["secagg"] and start["config"]["dp"]
    assert len(start["code"]["sources_sha256"]) == 64 and start["resume_after_round"] == 0
    joined = {e["node_id"]: e["key_fingerprint"] for e in _events(events, "bank_joined")}
    keys = consortium.certs / "banks"
    assert joined == {int(consortium.node_ids[b]): key_fingerprint(keys / f"{b}.pub") for b in BANKS[:3]}
    (release,) = _events(events, "entity_release")  # the consortium features on the real SuperLink path
    assert release["contributing"] == 3 and set(release["participants"]) == set(joined)
    assert "key" not in release["release"] and release["table_version"].startswith("consortium-v1:")
    rounds = _events(events, "round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(e == pytest.approx(3.0, abs=0.02) for e in rounds[-1]["entity_epsilon"].values())
    for record in rounds:
        assert set(record["participants"]) == set(joined) and record["dropouts"] == {}
        assert set(record["epsilon"]) == {"0", "1", "2"}
        assert all(0 < eps <= 3.0 + 1e-6 for eps in record["epsilon"].values())
    assert all(rounds[1]["epsilon"][b] > rounds[0]["epsilon"][b] for b in ("0", "1", "2"))
    assert [c["round"] for c in _events(events, "checkpoint")] == [1, 2]
    end = _events(events, "run_end")[0]
    assert end["status"] == "completed" and end["rounds_done"] == 2
    checkpoint = load_checkpoint(consortium.root / "runs" / "tls")
    assert checkpoint is not None and checkpoint.round == 2
    assert all(np.isfinite(w).all() for w in checkpoint.weights)
    assert (
        model_hash(checkpoint.weights)
        == end["model_hash"]
        == rounds[1]["model_hash"]
        != rounds[0]["model_hash"]
    )
    metrics = checkpoint.history[-1]["banks"]
    assert set(metrics) == {"0", "1", "2"} and all(0 <= m["ap"] <= 1 for m in metrics.values())
    for index, bank in enumerate(BANKS[:3]):
        state = consortium.bank_state(bank, "tls")
        sent = [r for r in read_sent_log(state / "sent.jsonl") if r["run_id"] == start["run_id"]]
        stages = {r["secagg_stage"] for r in sent}
        assert {"setup", "share_keys", "collect_masked_vectors", "unmask"} <= stages
        assert all(r["bytes"] > 0 and not r["error"] for r in sent)
        assert math.isclose(sent[-1]["epsilon"], rounds[1]["epsilon"][str(index)], rel_tol=1e-9)
        (joined_release,) = ledger(state / "ledger.json")["releases"]
        assert joined_release["version"] == release["table_version"]
        spent = ledger(state / "ledger.json")["state"]["dp-epsilon-spent"]
        assert math.isclose(spent, rounds[1]["epsilon"][str(index)], rel_tol=1e-9)


def test_unregistered_revoked_plaintext_and_foreign_ca_nodes_are_refused(consortium: Consortium):
    since = len(consortium.audit())
    keys = consortium.certs / "banks"
    once = ("--restarts", "0")
    refused = {
        "stranger": consortium.start_bank("stranger", 0, *once),
        "revoked": consortium.start_bank("revoked", 0, *once),
        "foreign-ca": consortium.start_bank(
            "foreign", 0, *once, key="stranger", ca=consortium.root / "foreign-ca" / "ca.crt"
        ),
        "plaintext": consortium.start_bank("plaintext", 0, "--insecure", "--max-retries", "2", *once),
    }
    for name, proc in refused.items():
        assert proc.wait(timeout=240) != 0, f"{name}: {proc.text()[-2000:]}"
    assert "CERTIFICATE_VERIFY_FAILED" in refused["foreign-ca"].text()
    failed = {e["key_fingerprint"] for e in _events(consortium.audit(since), "auth_failed")}
    assert {key_fingerprint(keys / "stranger.pub"), key_fingerprint(keys / "revoked.pub")} <= failed
    # none of the refused nodes is online (banks stopped by the previous test may still be listed online
    # until their heartbeat expires, so compare with the registered, unrevoked banks)
    online = consortium.online()
    assert consortium.node_ids["revoked"] not in online
    assert online <= {consortium.node_ids[b] for b in BANKS}


def test_a_connected_bank_revoked_is_refused_at_its_next_request(consortium: Consortium):
    from server import registry  # noqa: PLC0415

    since = len(consortium.audit())
    node = consortium.start_bank("connected", 0, "--restarts", "0")
    consortium.wait_online(["connected"])
    registry.revoke_bank(
        consortium.node_ids["connected"], connection="fedfraud", flwr_home=consortium.flwr_home
    )
    node.wait(timeout=120)  # refused at its next request: Flower's SuperNode shuts down
    assert "SuperNode terminated" in node.text(), node.text()[-2000:]
    refused = [e["api"] for e in _events(consortium.audit(since), "auth_failed")]  # a 401 names no key
    assert any(api.startswith("/v1/fleet/") for api in refused), refused
    assert consortium.node_ids["connected"] not in consortium.online()


def test_a_bank_killed_mid_round_is_a_dropout_and_the_round_completes(consortium: Consortium):
    since = len(consortium.audit())
    with consortium.banks(BANKS, "dropout") as banks:
        _kill_in_round_two(consortium, banks["bank3"])
    events = consortium.audit(since)
    rounds = {r["round"]: r for r in _events(events, "round")}
    assert sorted(rounds) == [1, 2] and not _events(events, "round_skipped")
    others = {int(consortium.node_ids[b]) for b in BANKS[:3]}
    assert set(rounds[1]["participants"]) == others | {int(consortium.node_ids["bank3"])}
    assert set(rounds[2]["participants"]) == others
    assert set(rounds[2]["dropouts"]) == {consortium.node_ids["bank3"]}
    assert set(rounds[2]["epsilon"]) == {"0", "1", "2"}
    assert _events(events, "run_end")[0]["status"] == "completed"


def _kill_in_round_two(consortium: Consortium, victim) -> None:
    """Run 2 rounds; SIGKILL the victim once its round-2 key shares reached the SuperLink.

    SecAgg+ then misses its masked update and reconstructs its masks from the others' shares. (Flower 1.42
    cannot recover a bank that dies before its key shares arrive: its peers fail with a KeyError.)
    """
    run = consortium.run("dropout", rounds=2, run_config="min-fit-banks=3")
    sent = consortium.bank_state("bank3", "dropout") / "sent.jsonl"

    def second_round_keys_delivered() -> bool:
        records = read_sent_log(sent) if sent.exists() else []
        shared = [i for i, r in enumerate(records) if r["round"] == "2" and r["secagg_stage"] == "share_keys"]
        lines = victim.text().splitlines()  # the SuperNode logs "INFO <time>: Sent successfully" per reply
        delivered = sum(
            1 for line in lines if line.startswith("INFO 20") and line.endswith("Sent successfully")
        )
        return bool(shared) and delivered > shared[0]

    wait_for(second_round_keys_delivered, timeout=RUN_TIMEOUT, what="bank3's round-2 key shares", poll=0.05)
    victim.kill()
    _finish(run)


def test_a_killed_server_resumes_at_the_next_round_with_the_ledgers_intact(consortium: Consortium):
    since = len(consortium.audit())
    with consortium.banks(BANKS[:3], "resume"):
        before, done = _kill_server_after_a_checkpoint(consortium, since)
        consortium.start_server()
        consortium.wait_online(BANKS[:3])
        _finish(consortium.run("resume", rounds=3, run_config="min-fit-banks=3"))
    events = consortium.audit(since)
    resumed = _events(events, "run_start")[-1]
    assert resumed["resume_after_round"] == done >= 1
    after_restart = events[events.index(resumed) :]
    assert [r["round"] for r in _events(after_restart, "round")] == list(range(done + 1, 4))
    end = _events(after_restart, "run_end")[0]
    assert end["status"] == "completed" and end["rounds_done"] == 3
    for index, bank in enumerate(BANKS[:3]):
        old, new = before[bank], ledger(consortium.bank_state(bank, "resume") / "ledger.json")
        assert new["rounds"][: len(old["rounds"])] == old["rounds"]  # appended to, never reset
        assert sum(new["state"]["dp-history-steps"]) > sum(old["state"]["dp-history-steps"])
        epsilons = [r["epsilon"] for r in new["rounds"]]
        assert epsilons == sorted(epsilons) and epsilons[-1] > old["state"]["dp-epsilon-spent"]
        last = _events(after_restart, "round")[-1]["epsilon"][str(index)]
        assert math.isclose(last, new["state"]["dp-epsilon-spent"], rel_tol=1e-9)


def _kill_server_after_a_checkpoint(consortium: Consortium, since: int):
    """Start a 3-round run; SIGKILL the SuperLink (with its ServerApp) and the run after a checkpoint."""
    run = consortium.run("resume", rounds=3, run_config="min-fit-banks=3")
    wait_for(
        lambda: any(e["event"] == "checkpoint" for e in consortium.audit(since)),
        timeout=RUN_TIMEOUT,
        what="the first checkpoint",
    )
    server = next(p for p in consortium.procs if p.log.name == "server.log" and p.alive())
    server.kill()
    run.kill()
    before = {b: ledger(consortium.bank_state(b, "resume") / "ledger.json") for b in BANKS[:3]}
    done = max(e["round"] for e in consortium.audit(since) if e["event"] == "checkpoint")
    return before, done
