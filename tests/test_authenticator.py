"""The authenticator's memory of verified API keys: it saves the salted hash, never a refusal it owes."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from dhow.access.authenticator import Authenticator, Credentials
from dhow.access.store import AccessStore, Limits, PrincipalRecord
from dhow.core.errors import Unauthenticated


@pytest.fixture
def store(tmp_path: Path) -> AccessStore:
    return AccessStore.open(f"sqlite:///{tmp_path / 'registry.sqlite3'}")


def _bearer(token: str) -> Credentials:
    return Credentials(authorization=f"Bearer {token}")


def _invoker(store: AccessStore) -> tuple[PrincipalRecord, str, Authenticator]:
    """An invoker key made in ``store``: its record, its token, and an authenticator that has read it."""
    made = store.create_key("bot", tenant="default", roles=["invoker"], actor="test")
    assert made is not None
    authenticator = Authenticator(store)
    authenticator.reload()
    return made[0], made[1], authenticator


def test_a_remembered_key_answers_as_its_principal_and_a_wrong_secret_is_still_refused(store: AccessStore) -> None:
    record, token, authenticator = _invoker(store)
    first = authenticator.known(_bearer(token))
    assert first is not None and first.record_id == record.id
    assert authenticator.known(_bearer(token)) is first
    with pytest.raises(Unauthenticated, match="not valid"):
        authenticator.known(_bearer(token[:-1] + ("A" if token[-1] != "A" else "B")))
    with pytest.raises(Unauthenticated, match="more than one"):
        authenticator.known(Credentials(authorization=f"Bearer {token}", repeated_authorization=True))


def test_a_revoked_key_is_refused_once_the_keys_are_read_again(store: AccessStore) -> None:
    record, token, authenticator = _invoker(store)
    assert authenticator.known(_bearer(token)) is not None  # now remembered
    store.revoke(record.id, actor="test")
    authenticator.reload()
    with pytest.raises(Unauthenticated, match="not valid"):
        authenticator.known(_bearer(token))


def test_a_remembered_key_is_refused_once_it_expires(store: AccessStore) -> None:
    made = store.create_key("bot", tenant="default", roles=["invoker"], actor="test", expires_in_s=3)
    assert made is not None and made[0].expires_at is not None
    record, token = made
    authenticator = Authenticator(store)
    authenticator.reload()
    assert authenticator.known(_bearer(token)) is not None  # now remembered
    time.sleep(max(0.0, datetime.fromisoformat(record.expires_at).timestamp() - time.time()) + 0.05)
    with pytest.raises(Unauthenticated, match="has expired"):
        authenticator.known(_bearer(token))


def test_only_the_usual_spelling_of_a_keys_header_is_remembered(store: AccessStore) -> None:
    """Other spellings of one key's header are accepted and not remembered: each would hold an entry, and its
    size, until the next reload (a client could fill the memory with one valid key)."""
    record, token, authenticator = _invoker(store)
    for spelling in (f"bearer {token}", f"Bearer {' ' * 1000}{token}", f"BEARER {token} "):
        principal = authenticator.known(Credentials(authorization=spelling))
        assert principal is not None and principal.record_id == record.id
    assert authenticator._verified == {}
    authenticator.known(_bearer(token))
    assert list(authenticator._verified) == [f"Bearer {token}"]


def test_two_reloads_at_once_never_bring_back_a_revoked_key(store: AccessStore) -> None:
    """The poller's reload reads the keys while a SIGHUP's reload runs after a revocation: the older read must not
    land last and bring the revoked key back."""
    record, token, authenticator = _invoker(store)
    reading, go_on = threading.Event(), threading.Event()
    principals = store.principals

    def slow_principals() -> list[PrincipalRecord]:
        read = principals()  # the keys as they were, with the key not yet revoked
        if threading.current_thread().name == "poller":
            reading.set()
            go_on.wait(5)
        return read

    store.principals = slow_principals  # type: ignore[method-assign]
    poller = threading.Thread(target=authenticator.reload, args=(True,), name="poller")
    poller.start()
    assert reading.wait(5)
    store.revoke(record.id, actor="test")
    hup = threading.Thread(target=authenticator.reload, args=(True,), name="sighup")
    hup.start()
    hup.join(0.5)  # it waits for the poller's reload (or, without the lock, finishes first)
    go_on.set()
    poller.join(5)
    hup.join(5)
    with pytest.raises(Unauthenticated, match="not valid"):
        authenticator.known(_bearer(token))


def test_an_unknown_key_id_costs_the_same_check_as_a_known_one(
    store: AccessStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal of an unknown id hashes the secret as a known id's does: its time does not tell which ids exist."""
    _, token, authenticator = _invoker(store)
    import dhow.access.authenticator as module

    checked: list[str] = []
    real = module.verify_secret
    monkeypatch.setattr(
        module, "verify_secret", lambda salt, hashed, secret: checked.append(secret) or real(salt, hashed, secret)
    )
    unknown = "dhow_" + "x" * 12 + "_" + token.rsplit("_", 1)[1]
    with pytest.raises(Unauthenticated, match="not valid"):
        authenticator.known(_bearer(unknown))
    assert checked == [token.rsplit("_", 1)[1]]


def test_a_keys_quotas_and_region_are_remembered_until_the_keys_are_read_again(store: AccessStore) -> None:
    """Every request asks for its principal's quotas and region: remembered per key, and a reload forgets them, so
    that quotas set on a key or its tenant count from the next read of the store on."""
    record, token, authenticator = _invoker(store)
    principal = authenticator.known(_bearer(token))
    assert principal is not None
    assert authenticator.admission_of(principal) == ("", ())
    assert authenticator.admission_of(principal) is authenticator.admission_of(principal)
    store.set_limits(record.id, Limits(rate=5.0))
    store.set_tenant("default", limits=Limits(concurrency=2), region="eu", actor="test")
    assert authenticator.admission_of(principal) == ("", ())  # not read yet
    authenticator.reload()
    principal = authenticator.known(_bearer(token))
    assert principal is not None
    region, quotas = authenticator.admission_of(principal)
    assert region == "eu"
    assert [(subject, limits) for subject, limits, _ in quotas] == [
        (f"principal:{record.id}", Limits(rate=5.0)),
        ("tenant:default", Limits(concurrency=2)),
    ]


def test_a_principal_from_before_a_reload_leaves_no_answer_for_the_identity_re_created_under_its_id(
    store: AccessStore,
) -> None:
    """A gRPC stream authenticates once and keeps its principal across reloads. A certificate identity revoked and
    made again under the same CN (the same record id) with another tenant and region must get its own region and
    quotas, whichever principal asks first after the reload."""
    store.set_tenant("a", limits=Limits(concurrency=1), region="us", actor="test")
    store.set_tenant("b", limits=Limits(concurrency=50), region="eu", actor="test")
    store.create_identity("svc", tenant="a", roles=["invoker"], actor="test", region="us")
    authenticator = Authenticator(store)
    authenticator.reload()
    streamed = authenticator.known(Credentials(client_cn="svc"))
    assert streamed is not None
    store.revoke("cert:svc", actor="test")
    store.create_identity("svc", tenant="b", roles=["invoker"], actor="test", region="eu")
    authenticator.reload()
    fresh = authenticator.known(Credentials(client_cn="svc"))
    assert fresh is not None and fresh.record_id == streamed.record_id and fresh.tenant == "b"
    assert authenticator.admission_of(streamed)[0] == "us"  # the stream's next request: its own principal's answer
    region, quotas = authenticator.admission_of(fresh)
    assert region == "eu"
    assert [subject for subject, _, _ in quotas] == ["tenant:b"]
    assert authenticator.admission_of(streamed)[0] == "us"
    assert authenticator.admission_of(fresh) == (region, quotas)
