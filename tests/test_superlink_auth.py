"""Signed timestamps verified once: the SuperLink answers as Flower does, a bad signature is refused."""

from __future__ import annotations

import time

import pytest
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message
from flwr.superlink.routers.fleet import node_auth
from flwr.supernode import node_auth_http_interceptor as interceptor

from clients import fast_supernode
from server import superlink_auth
from tests.test_superlink_routes import CASES, _app, _post

KEY, PUBLIC = generate_key_pairs()
PUBLIC_BYTES = public_key_to_bytes(PUBLIC)


@pytest.fixture
def memo(monkeypatch):
    """A memo over Flower's parse and verify, counting the verifications that really ran."""
    verified: list[bytes] = []
    verify = node_auth.verify_signature

    def counting(key, message, signature):
        verified.append(message)
        return verify(key, message, signature)

    return superlink_auth.SignatureMemo(node_auth.bytes_to_public_key, counting), verified


def test_a_signature_is_verified_once_and_a_bad_one_every_time(memo):
    memo, verified = memo
    stamp = b"2026-11-27T03:00:00.000001+00:00"
    signature = sign_message(KEY, stamp)
    key = memo.public_key(PUBLIC_BYTES)
    assert memo.public_key(PUBLIC_BYTES) is key  # parsed once
    assert memo.verified(key, stamp, signature) and memo.verified(key, stamp, signature)
    assert verified == [stamp]
    other = b"2026-11-27T03:00:01.000001+00:00"
    assert not memo.verified(key, other, signature) and not memo.verified(key, other, signature)
    assert verified == [stamp, other, other]  # an invalid signature is never remembered
    foreign = generate_key_pairs()[1]  # a key object not parsed here: Flower's verification
    assert not memo.verified(foreign, stamp, signature) and len(verified) == 4


def test_the_memo_is_bounded(memo, monkeypatch):
    memo, _ = memo
    monkeypatch.setattr(superlink_auth, "MAX_VERIFIED", 2)
    key = memo.public_key(PUBLIC_BYTES)
    stamps = [f"2026-11-27T03:00:0{i}+00:00".encode() for i in range(3)]
    for stamp in stamps:
        assert memo.verified(key, stamp, sign_message(KEY, stamp))
    assert [stamp for _, stamp, _ in memo.valid] == stamps[1:]  # the oldest dropped


@pytest.mark.parametrize("case", sorted(CASES))
def test_fleet_requests_are_answered_as_without_the_memo(case, monkeypatch):
    want = _post(_app(direct=True), case)
    monkeypatch.setattr(node_auth, "bytes_to_public_key", node_auth.bytes_to_public_key)
    monkeypatch.setattr(node_auth, "verify_signature", node_auth.verify_signature)
    assert superlink_auth.patch_signatures()
    client = _app(direct=True)
    for _ in range(2):  # the second one from the memo where the first verified
        got = _post(client, case)
        assert (got.status_code, got.content) == (want.status_code, want.content)


class _Context:
    def __init__(self) -> None:
        self.request = type("R", (), {"headers": {}})()


def test_a_node_signs_once_a_second_with_flowers_headers(monkeypatch):
    monkeypatch.setattr(
        interceptor.NodeAuthHttpInterceptor, "intercept", interceptor.NodeAuthHttpInterceptor.intercept
    )
    stock = interceptor.NodeAuthHttpInterceptor(KEY, PUBLIC)
    sent: list[dict] = []

    def send(context):
        sent.append(dict(context.request.headers))

    stock.intercept(_Context(), send)
    assert fast_supernode.patch_signing(reuse_s=0.3)
    node = interceptor.NodeAuthHttpInterceptor(KEY, PUBLIC)
    node.intercept(_Context(), send)
    node.intercept(_Context(), send)
    time.sleep(0.35)
    node.intercept(_Context(), send)
    assert [set(h) for h in sent] == [set(sent[0])] * 4  # the same headers as Flower's
    stamp = node_auth.TIMESTAMP_HEADER
    assert sent[1][stamp] == sent[2][stamp] != sent[3][stamp]  # reused, then signed anew
    for headers in sent:
        signature = node_auth.b64decode(headers[node_auth.FLEET_HTTP_SIGNATURE_HEADER])
        public = node_auth.bytes_to_public_key(
            node_auth.b64decode(headers[node_auth.FLEET_HTTP_PUBLIC_KEY_HEADER])
        )
        assert node_auth.verify_signature(public, headers[stamp].encode("ascii"), signature)
    assert not fast_supernode.patch_signing(reuse_s=0)  # 0: every request signed anew (left stock)
