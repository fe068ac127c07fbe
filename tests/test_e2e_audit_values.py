"""A real `dhow serve` with JWTs, its audit trail on PostgreSQL: a token whose claims hold a NUL or a lone surrogate
is audited as it came, and the records of the requests after it are written (such a record once held them all)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import jwt as pyjwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from dhow.governance.audit import AuditStore
from tests.conftest import DhowProcess, start_dhow, wait_until

ISSUER = "https://issuer.test"
BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.25] * 32}]}).encode()


def _infer(url: str, token: str) -> int:
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        connection.request("POST", "/v2/models/tabular/infer", body=BODY, headers=headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def _issuer(folder: Path) -> tuple[rsa.RSAPrivateKey, Path]:
    """A signing key and the JWKS that publishes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return key, jwks


def _token(key: rsa.RSAPrivateKey, sub: str, role: str = "invoker") -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "dhow", "sub": sub, "iat": now, "exp": now + 300, "roles": [role]}
    # (a lone surrogate goes as its JSON escape \ud800, which the server's JWT library decodes to one)
    return pyjwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})


def _server(demo_repository: Path, folder: Path, audit_url: str, jwks: Path, workers: int = 1) -> DhowProcess:
    repository = folder / "models"
    repository.mkdir()
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    server = start_dhow(
        repository, folder, "--auth", "on", "--audit-store", audit_url, "--workers", str(workers),
        "--jwt-issuer", ISSUER, "--jwt-jwks", str(jwks), "--jwt-audience", "dhow",
    )  # fmt: skip
    if workers > 1:  # (each sets its metrics when it starts)
        wait_until(lambda: "workers are ready" in server.log(), 60, "every worker ready")
    return server


def test_a_jwt_whose_claims_hold_a_nul_is_audited_on_postgresql(
    demo_repository: Path, tmp_path: Path, pg_database: str
) -> None:
    key, jwks = _issuer(tmp_path)
    server = _server(demo_repository, tmp_path, pg_database, jwks)
    store = AuditStore.open(pg_database)
    try:
        url = server.http_url
        assert _infer(url, _token(key, "al\x00ice")) == 200, server.log()
        assert _infer(url, _token(key, "bob\ud800")) == 200, server.log()
        for _ in range(3):
            assert _infer(url, _token(key, "carol")) == 200, server.log()

        def written() -> bool:
            return len([row for row in store.read(limit=1000) if row["kind"] == "inference"]) >= 5

        wait_until(written, 30, "the inference records written")
        rows = [row for row in store.read(limit=1000) if row["kind"] == "inference"]
        assert [row["actor"] for row in rows] == ["jwt:al\x00ice", "jwt:bob\\ud800", *["jwt:carol"] * 3]
        assert [row["request_id"] for row in store.read(actor="jwt:al\x00ice")] == [rows[0]["request_id"]]
        assert store.verify().ok
    finally:
        store.close()
        assert server.stop() == 0, server.log()
    assert "refused a record" not in server.log() and "cannot write to the audit trail" not in server.log()


def test_a_record_the_store_refuses_is_written_as_unwritable_and_the_trail_goes_on(
    demo_repository: Path, tmp_path: Path, latin1_database: str
) -> None:
    """An audit store on a PostgreSQL database in LATIN1 cannot hold a JWT sub with an emoji: the record is written
    as an ``audit.unwritable`` record that holds it, the server logs it, and the requests after it are audited."""
    key, jwks = _issuer(tmp_path)
    server = _server(demo_repository, tmp_path, latin1_database, jwks)
    store = AuditStore.open(latin1_database)
    try:
        for sub in ("dan", "\U0001f600", "erin"):
            assert _infer(server.http_url, _token(key, sub)) == 200, server.log()
        wait_until(lambda: any(row["actor"] == "jwt:erin" for row in store.read(limit=1000)), 30, "erin's record")
        rows = [row for row in store.read(limit=1000) if row["actor"] != "dhow:first-start"]
        assert [row["kind"] for row in rows] == ["inference", "audit.unwritable", "inference"]
        assert json.loads(rows[1]["details"]["record"])["actor"] == "jwt:\U0001f600" and store.verify().ok
        # and counted, for the alert (DhowAuditRecordsRefused)
        asked = urllib.request.Request(f"http://{server.http_url}/metrics")
        asked.add_header("Authorization", f"Bearer {_token(key, 'prometheus', 'auditor')}")
        metrics = urllib.request.urlopen(asked, timeout=10).read().decode()
        assert "dhow_audit_unwritable_records_total 1.0" in metrics
    finally:
        store.close()
        assert server.stop() == 0, server.log()
    assert "refused a record: written in its place as an audit.unwritable record" in server.log()


def _metric(server: DhowProcess, key: rsa.RSAPrivateKey, name: str) -> float | None:
    asked = urllib.request.Request(f"http://{server.http_url}/metrics")
    asked.add_header("Authorization", f"Bearer {_token(key, 'prometheus', 'auditor')}")
    metrics = urllib.request.urlopen(asked, timeout=10).read().decode()
    found = [float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M)]
    return max(found) if found else None  # (the highest of its series, if labelled)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_store_refusing_even_the_stand_in_is_shown_while_it_lasts(
    demo_repository: Path, tmp_path: Path, latin1_database: str, workers: int
) -> None:
    """The LATIN1 database refuses the emoji's record, and a DBA's trigger every record of the audit writer, its
    stand-ins: ``dhow_audit_refusing_all`` is 1 (alert DhowAuditStoreRefusingAll) as long as that lasts, not a count
    that an alert over 10 minutes forgets; the trigger dropped, the record is replaced and counted once. With
    several workers too, where /metrics is built from the workers' metric files (a gauge read at the scrape was
    never written to them: it showed 0)."""
    key, jwks = _issuer(tmp_path)
    server = _server(demo_repository, tmp_path, latin1_database, jwks, workers)
    store = AuditStore.open(latin1_database)
    try:
        with psycopg.connect(latin1_database, autocommit=True) as pg:
            pg.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.value = "
                "'dhow:audit-writer' THEN RAISE EXCEPTION 'no record of the writer'; END IF; RETURN NEW; END $$"
            )
            pg.execute("CREATE TRIGGER refuse BEFORE INSERT ON dhow_audit_keys FOR EACH ROW EXECUTE FUNCTION refuse()")
        assert _metric(server, key, "dhow_audit_refusing_all") == 0
        assert _infer(server.http_url, _token(key, "\U0001f600")) == 200, server.log()
        stuck = r'dhow_audit_refusing_all\{region="default"\}'  # (the store of the server's region, --region)
        wait_until(lambda: _metric(server, key, stuck) == 1, 30, "the gauge at 1")
        for _ in range(3):  # it stays at 1 while the writer retries
            time.sleep(1)
            assert _metric(server, key, "dhow_audit_refusing_all") == 1
        assert _metric(server, key, "dhow_audit_unwritable_records_total") == 0
        with psycopg.connect(latin1_database, autocommit=True) as pg:
            pg.execute("DROP TRIGGER refuse ON dhow_audit_keys")
        wait_until(lambda: _metric(server, key, "dhow_audit_refusing_all") == 0, 30, "the gauge back at 0")
        assert _metric(server, key, "dhow_audit_unwritable_records_total") == 1
        assert [row["kind"] for row in store.read(limit=1000) if row["actor"] != "dhow:first-start"] == [
            "audit.unwritable"
        ]
    finally:
        store.close()
        assert server.stop() == 0, server.log()
    assert "and even its smallest audit.unwritable stand-in" in server.log()
