"""Settings precedence: command line > environment > file > default, with clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhow.core.errors import InvalidInput
from dhow.settings import ServerSettings, resolve_settings


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
    with pytest.raises(InvalidInput, match="unknown setting 'htp_port'"):
        resolve_settings({}, {}, config)


def test_lists_from_environment() -> None:
    settings = resolve_settings({}, {"DHOW_LOAD_MODELS": "a, b", "DHOW_ALLOW_MODEL_UPLOAD": "true"})
    assert settings.load_models == ("a", "b")
    assert settings.allow_model_upload is True


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
