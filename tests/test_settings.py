"""Settings precedence: command line > environment > file > default, with clear refusals."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from dhow.core.errors import InvalidInput
from dhow.settings import ServerSettings, resolve_settings, setting_options


def test_precedence(tmp_path: Path) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text("http_port: 9000\ngrpc_port: 9001\nhost: 0.0.0.0\n")
    env = {"DHOW_GRPC_PORT": "9101", "DHOW_HOST": "10.0.0.1"}
    settings = resolve_settings({"host": "127.0.0.2", "http_port": None}, env, config)
    assert settings.http_port == 9000  # file
    assert settings.grpc_port == 9101  # environment over file
    assert settings.host == "127.0.0.2"  # command line over both
    assert settings.model_control == ServerSettings().model_control  # default


def test_refusals_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="environment variable DHOW_HTTP_PORT"):
        resolve_settings({}, {"DHOW_HTTP_PORT": "eighty"})
    with pytest.raises(InvalidInput, match="must be one of none, poll, explicit"):
        resolve_settings({"model_control": "auto"}, {})
    config = tmp_path / "bad.yaml"
    config.write_text("htp_port: 1\n")
    with pytest.raises(InvalidInput, match="unknown setting 'htp_port', did you mean http_port"):
        resolve_settings({}, {}, config)
    config.write_text("colour: red\n")  # nothing close: no guess
    with pytest.raises(InvalidInput, match=r"unknown setting 'colour' \(known: repository, host"):
        resolve_settings({}, {}, config)


def test_lists_from_environment() -> None:
    settings = resolve_settings({}, {"DHOW_LOAD_MODELS": "a, b", "DHOW_ALLOW_MODEL_UPLOAD": "true"})
    assert settings.load_models == ("a", "b")
    assert settings.allow_model_upload is True


def test_switches_take_true_or_false_from_every_source() -> None:
    from dhow import cli

    assert ServerSettings().strict_readiness is True
    parse = cli._parser().parse_args
    assert resolve_settings(vars(parse(["serve", "--strict-readiness", "false"])), {}).strict_readiness is False
    assert resolve_settings(vars(parse(["serve", "--allow-model-upload"])), {}).allow_model_upload is True
    assert resolve_settings({}, {"DHOW_STRICT_READINESS": "off"}).strict_readiness is False
    with pytest.raises(InvalidInput, match="option --strict-readiness: 'strict_readiness' expects bool, got 'maybe'"):
        resolve_settings(vars(parse(["serve", "--strict-readiness", "maybe"])), {})


def test_workers_from_every_source_and_at_least_one(tmp_path: Path) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text("workers: 3\n")
    assert ServerSettings().workers == 1
    assert resolve_settings({}, {}, config).workers == 3
    assert resolve_settings({}, {"DHOW_WORKERS": "4"}, config).workers == 4
    assert resolve_settings({"workers": 2}, {"DHOW_WORKERS": "4"}, config).workers == 2
    with pytest.raises(InvalidInput, match=r"option --workers: 'workers' must be an integer of at least 1, got 0"):
        resolve_settings({"workers": 0}, {})
    with pytest.raises(InvalidInput, match=r"environment variable DHOW_WORKERS: 'workers' expects int, got 'two'"):
        resolve_settings({}, {"DHOW_WORKERS": "two"})
    config.write_text("workers: -1\n")
    with pytest.raises(InvalidInput, match=r"settings file .*: 'workers' must be an integer of at least 1, got -1"):
        resolve_settings({}, {}, config)


def test_the_audit_commit_window_is_milliseconds_from_0_to_a_second() -> None:
    assert ServerSettings().audit_commit_ms == 25
    assert resolve_settings({}, {"DHOW_AUDIT_COMMIT_MS": "0"}).audit_commit_ms == 0
    assert resolve_settings({"audit_commit_ms": 1000}, {}).audit_commit_ms == 1000
    for bad in (-1, 1001):
        with pytest.raises(
            InvalidInput,
            match=rf"option --audit-commit-ms: 'audit_commit_ms' must be an integer of milliseconds from 0 to 1000, "
            rf"got {bad}",
        ):
            resolve_settings({"audit_commit_ms": bad}, {})


# -- one precedence for what every command shares: stores, data folder, actor ------------------------------

#: a value for each source, so that the winner says which source won
SHARED = {
    "registry": ("postgresql://cli/r", "postgresql://env/r", "postgresql://file/r"),
    "audit_store": ("sqlite:///cli.db", "sqlite:///env.db", "sqlite:///file.db"),
    "data_dir": ("/srv/cli", "/srv/env", "/srv/file"),
    "actor": ("cli-user", "env-user", "file-user"),
}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_settings_take_cli_over_env_over_file_over_default(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USER", "login-user")  # the actor's default
    from_cli, from_env, from_file = SHARED[name]
    config = tmp_path / "dhow.yaml"
    config.write_text(f"{name}: {from_file}\n")
    env = {f"DHOW_{name.upper()}": from_env}

    def chosen(cli: dict[str, object], env: dict[str, str], config: Path | None) -> object:
        settings = resolve_settings(cli, env, config)
        return settings.actor_name() if name == "actor" else str(getattr(settings, name))

    assert chosen({name: from_cli}, env, config) == from_cli
    assert chosen({name: None}, env, config) == from_env
    assert chosen({}, {}, config) == from_file
    default = "login-user" if name == "actor" else str(getattr(ServerSettings(), name))
    assert chosen({}, {}, None) == default


def test_a_file_url_repository_is_its_path_and_another_host_is_refused(tmp_path: Path) -> None:
    assert ServerSettings(repository=f"file://localhost{tmp_path}").repository_folder() == tmp_path
    assert ServerSettings(repository=f"file://{tmp_path}").repository_folder() == tmp_path
    with pytest.raises(InvalidInput, match=f"--repository 'file://walk{tmp_path}'.* write file:///walk{tmp_path}"):
        ServerSettings(repository=f"file://walk{tmp_path}").repository_folder()


def test_a_file_url_repository_is_percent_decoded_and_a_hash_or_query_refused(tmp_path: Path) -> None:
    """``#`` and ``?`` end a URL's path: ``file:///models/run#3`` named /models/run. Plain paths are as written."""
    assert ServerSettings(repository=f"file://{tmp_path}/my%20models").repository_folder() == tmp_path / "my models"
    assert ServerSettings(repository=f"{tmp_path}/run#3%20").repository_folder() == tmp_path / "run#3%20"
    refusals = {"#": f"write # as %23: file://{tmp_path}/run%233", "?": f"write ? as %3F: file://{tmp_path}/run%3F3"}
    for mark, said in refusals.items():
        with pytest.raises(InvalidInput) as refused:
            ServerSettings(repository=f"file://{tmp_path}/run{mark}3").repository_folder()
        assert refused.value.message.startswith(f"--repository 'file://{tmp_path}/run{mark}3': ")
        assert refused.value.message.endswith(said)


def test_a_trace_sample_ratio_without_a_collector_is_refused_to_a_server_only(tmp_path: Path) -> None:
    """It traced nothing, silently; an endpoint given empty is tracing turned off on purpose. An admin command
    (``dhow keys``) reading the server's environment or file, which takes no --otlp-endpoint, is not refused."""
    needs = "needs --otlp-endpoint, the collector the spans go to"
    with pytest.raises(InvalidInput, match=f"option --trace-sample-ratio: the share of requests traced {needs}"):
        resolve_settings({"trace_sample_ratio": "0.5"}, {}, serving=True)
    config = tmp_path / "dhow.yaml"
    config.write_text("trace_sample_ratio: 0.5\n")
    with pytest.raises(InvalidInput, match=f"settings file {config}: the share of requests traced {needs}"):
        resolve_settings({}, {}, config, serving=True)
    endpoint = "http://127.0.0.1:4318"
    assert (
        resolve_settings(
            {"trace_sample_ratio": "0.5"}, {"DHOW_OTLP_ENDPOINT": endpoint}, serving=True
        ).trace_sample_ratio
        == 0.5
    )
    assert resolve_settings({}, {"DHOW_OTLP_ENDPOINT": ""}, config, serving=True).otlp_endpoint == ""
    assert resolve_settings({}, {"DHOW_TRACE_SAMPLE_RATIO": "0.2"}).trace_sample_ratio == 0.2  # (an admin command)


def test_store_urls_follow_the_data_folder_that_won(tmp_path: Path) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text(f"data_dir: {tmp_path / 'file'}\n")
    settings = resolve_settings({"data_dir": tmp_path / "cli"}, {"DHOW_DATA_DIR": str(tmp_path / "env")}, config)
    assert settings.registry_url() == f"sqlite:///{tmp_path / 'cli' / 'registry.sqlite3'}"
    assert settings.audit_url() == f"sqlite:///{tmp_path / 'cli' / 'audit.sqlite3'}"
    settings = resolve_settings({}, {"DHOW_DATA_DIR": str(tmp_path / "env")}, config)
    assert settings.audit_urls() == {"default": f"sqlite:///{tmp_path / 'env' / 'audit.sqlite3'}"}
    # a store named anywhere wins over the data folder's, whatever the source of the folder
    settings = resolve_settings({"data_dir": tmp_path / "cli"}, {"DHOW_REGISTRY": "sqlite:///r.db"}, config)
    assert settings.registry_url() == "sqlite:///r.db"


def test_region_audit_stores_take_cli_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "dhow.yaml"
    config.write_text("region: ae\naudit_region_stores: ['eu=sqlite:///file-eu.db']\n")
    env = {"DHOW_AUDIT_REGION_STORES": "eu=sqlite:///env-eu.db, us=sqlite:///env-us.db"}
    urls = resolve_settings({"audit_region_stores": ["eu=sqlite:///cli-eu.db"]}, env, config).audit_urls()
    assert urls == {"ae": resolve_settings({}, {}, config).audit_url(), "eu": "sqlite:///cli-eu.db"}
    urls = resolve_settings({}, env, config).audit_urls()
    assert urls["eu"] == "sqlite:///env-eu.db" and urls["us"] == "sqlite:///env-us.db"
    assert resolve_settings({}, {}, config).audit_urls()["eu"] == "sqlite:///file-eu.db"
    assert resolve_settings({}, {}).audit_urls() == {"default": ServerSettings().audit_url()}
    with pytest.raises(InvalidInput, match=r"--audit-region-store expects REGION=URL, got 'eu'"):
        resolve_settings({"audit_region_stores": ["eu"]}, {}).audit_urls()
    with pytest.raises(InvalidInput, match="a region is 1-32 lower-case letters"):
        resolve_settings({"audit_region_stores": ["EU!=sqlite:///x.db"]}, {}).audit_urls()


def test_the_actor_is_the_login_name_else_anonymous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "alice")
    assert ServerSettings().actor_name() == "alice"  # bare: the name the server records for the CLI's requests
    monkeypatch.delenv("USER")
    monkeypatch.setattr("getpass.getuser", lambda: "bob")
    assert ServerSettings().actor_name() == "bob"

    def nobody() -> str:
        raise OSError("no user name")

    monkeypatch.setattr("getpass.getuser", nobody)
    assert ServerSettings().actor_name() == "anonymous"


# -- serve's options are the settings' fields ----------------------------------------------------------------


def test_serve_has_an_option_for_every_setting_but_the_secret_and_the_actor() -> None:
    from dhow import cli

    serve = argparse.ArgumentParser()
    cli._add_settings_options(serve)
    options = {action.dest: action for action in serve._actions}
    names = {field.name for field in dataclasses.fields(ServerSettings)}
    # streams: a list of mappings, from the settings file or DHOW_STREAMS only
    assert names - set(options) == {"kek", "actor", "streams"}  # a key on the command line is readable by every user
    for option in setting_options():
        action = options[option.name]
        assert option.doc in str(action.help) and action.default is None  # None: "not given", the field decides
        if option.default not in ("", (), False):
            assert f"(default: {option.default})" in str(action.help)
    args = cli._parser().parse_args(["serve", "--http-port", "9", "--load-model", "a", "--load-model", "b"])
    settings = resolve_settings(vars(args), {})
    assert (settings.http_port, settings.load_models, settings.grpc_port) == (9, ("a", "b"), 8081)
