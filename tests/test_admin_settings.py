"""The administration commands find the stores and name their actor as ``dhow.settings`` decides, like the server.

They run in-process on SQLite files of a temporary folder (no server needed: they work on the databases).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dhow import cli
from dhow.governance.audit import AuditStore

SHARED_VARIABLES = ("DHOW_ACTOR", "DHOW_DATA_DIR", "DHOW_REGISTRY", "DHOW_AUDIT_STORE")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in SHARED_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("USER", "alice")


def _admin_records(data_dir: Path) -> list[tuple[str, str]]:
    store = AuditStore.open(f"sqlite:///{data_dir / 'audit.sqlite3'}")
    try:
        return [(record["action"], record["actor"]) for record in store.read(kind="admin")]
    finally:
        store.close()


def test_keys_take_the_data_folder_and_actor_from_each_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text(f"data_dir: {tmp_path / 'file'}\nactor: file-admin\n")
    create = ("keys", "create", "bot", "--role", "invoker", "--config", str(config))
    assert cli.main([*create]) == 0
    assert _admin_records(tmp_path / "file") == [("key.create", "file-admin")]
    monkeypatch.setenv("DHOW_ACTOR", "env-admin")
    monkeypatch.setenv("DHOW_DATA_DIR", str(tmp_path / "env"))
    assert cli.main([*create]) == 0
    assert _admin_records(tmp_path / "env") == [("key.create", "env-admin")]
    assert cli.main([*create, "--data-dir", str(tmp_path / "cli")]) == 0
    assert _admin_records(tmp_path / "cli") == [("key.create", "env-admin")]
    # no setting names the actor: the login name, bare, as 'dhow rollout' sends it
    monkeypatch.delenv("DHOW_ACTOR")
    assert cli.main(["tenants", "set", "acme", "--rate", "5", "--data-dir", str(tmp_path / "cli")]) == 0
    assert _admin_records(tmp_path / "cli")[-1] == ("tenant.set", "alice")


def test_audit_finds_the_trail_the_keys_command_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")
    assert cli.main(["keys", "create", "bot", "--role", "invoker", "--config", str(config)]) == 0
    capsys.readouterr()
    assert cli.main(["audit", "verify", "--config", str(config)]) == 0
    assert "audit trail ok: 1 records" in capsys.readouterr().out
    # the option over the file: an empty folder has no trail
    assert cli.main(["audit", "verify", "--config", str(config), "--data-dir", str(tmp_path / "none")]) == 2
    assert f"no audit trail at {tmp_path / 'none' / 'audit.sqlite3'}" in capsys.readouterr().err


def test_a_bad_settings_file_is_refused_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text("data-folder: x\n")
    assert cli.main(["keys", "list", "--config", str(config)]) == 2
    assert f"settings file {config}: unknown setting 'data-folder'" in capsys.readouterr().err


def test_keys_and_tenants_list_as_tables_with_headers_or_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    assert (
        cli.main(["keys", "create", "ci-bot", "--role", "invoker:fraud-*", "--tenant", "acme", "--rate", "5", *data])
        == 0
    )
    key_id = capsys.readouterr().out.strip().splitlines()[-1].split("_")[1]
    assert cli.main(["keys", "list", *data]) == 0
    header, row = capsys.readouterr().out.splitlines()
    columns = ["ID", "KIND", "NAME", "TENANT", "ROLES", "REGION", "STATE", "RATE", "BURST", "CONCURRENCY", "EXPIRES"]
    assert header.split() == columns
    # one cell a column, aligned under its header; an empty one shows as '-'
    assert row.split() == [key_id, "key", "ci-bot", "acme", "invoker:fraud-*", "-", "active", "5/s", "-", "-", "-"]
    assert row.index("ci-bot") == header.index("NAME") and row.index("active") == header.index("STATE")
    assert cli.main(["keys", "list", "--json", *data]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["keys"]
    assert (listed["id"], listed["roles"], listed["rate"], listed["active"]) == (key_id, ["invoker:fraud-*"], 5.0, True)
    assert "secret_hash" not in listed and "salt" not in listed

    assert cli.main(["tenants", "list", *data]) == 0
    assert "no tenant has quotas" in capsys.readouterr().out
    assert cli.main(["tenants", "set", "acme", "--rate", "10", "--concurrency", "4", "--region", "ae", *data]) == 0
    capsys.readouterr()
    assert cli.main(["tenants", "list", *data]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [["TENANT", "REGION", "RATE", "BURST", "CONCURRENCY"], ["acme", "ae", "10/s", "-", "4"]]
    assert cli.main(["tenants", "list", "--json", *data]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "tenants": [{"name": "acme", "region": "ae", "rate": 10.0, "burst": 0, "concurrency": 4}]
    }


def test_keys_refuse_to_make_a_data_folder_nobody_named_and_say_where_they_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # a folder with no data folder, as a new user's home is
    for command in (["keys", "create", "bot", "--role", "invoker"], ["keys", "list"], ["tenants", "set", "acme"]):
        assert cli.main(command) == 2
        error = capsys.readouterr().err
        assert f"there is no data folder at {tmp_path / '.dhow'} and none was named" in error
        assert "--data-dir DIR" in error and "to start a new data folder here, pass --data-dir .dhow" in error
        assert not (tmp_path / ".dhow").exists()
    # named, it is made, and the command says where it wrote
    assert cli.main(["keys", "create", "bot", "--role", "invoker", "--data-dir", ".dhow"]) == 0
    folder = (tmp_path / ".dhow").resolve()
    where = f"registry {folder / 'registry.sqlite3'}, audit trail {folder / 'audit.sqlite3'}"
    assert capsys.readouterr().err == f"dhow keys: {where} (a new data folder)\n"
    # once it exists it is the default, and still named on every use
    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr()
    assert listing.err == f"dhow keys: {where}\n" and "bot" in listing.out
    # stores named by URL need no folder at all
    elsewhere = tmp_path / "elsewhere"
    stores = ["--registry", f"sqlite:///{elsewhere}/r.db", "--audit-store", f"sqlite:///{elsewhere}/a.db"]
    assert cli.main(["tenants", "set", "acme", "--data-dir", str(tmp_path / "unused"), *stores]) == 0
    assert f"registry {elsewhere / 'r.db'}, audit trail {elsewhere / 'a.db'}" in capsys.readouterr().err
    monkeypatch.chdir(elsewhere)
    assert cli.main(["tenants", "list", *stores]) == 0
    assert "acme" in capsys.readouterr().out and not (elsewhere / ".dhow").exists()
