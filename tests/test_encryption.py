"""Artifacts encrypted at rest: the envelope format and each refusal, keyrings, the repository commands,
every runtime loading from ciphertext in memory, and a real server serving an encrypted repository."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from dhow.commands.models import add_parsers, run
from dhow.core.artifacts import install_decryptor, is_encrypted, read_artifact
from dhow.core.datatypes import NUMPY_DTYPE
from dhow.core.errors import InvalidInput, ModelLoadError, NotFound
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.repository.encryption import (
    MAGIC,
    Keyring,
    artifact_digests,
    encrypt_repository,
    generate_key,
    rewrap_repository,
)
from dhow.runtimes.base import Runtime, create_runtime
from tests.conftest import DhowProcess, start_dhow
from tests.test_runtimes import CONFIGS

K1, K2 = generate_key(), generate_key()
PLAINTEXT = b"\x08\x07onnx-ish model bytes" * 100


def _keyring(text: str) -> Keyring:
    return Keyring.parse(text, "test keys")


BOTH = _keyring(f"k1:{K1}\nk2:{K2}")
ONLY_K1, ONLY_K2 = _keyring(f"k1:{K1}"), _keyring(f"k2:{K2}")


@pytest.fixture
def decryptor() -> Iterator[Keyring]:
    """Both keys installed process-wide, as the server does at start; uninstalled afterwards."""
    install_decryptor(BOTH.decrypt)
    yield BOTH
    install_decryptor(None)


def _header(data: bytes) -> tuple[int, dict[str, object]]:
    """Where the JSON header starts, and the header."""
    start = len(MAGIC) + 4
    (length,) = struct.unpack(">I", data[len(MAGIC) : start])
    return start, json.loads(data[start : start + length])


# -- the envelope ------------------------------------------------------------------------------


def test_round_trip_with_a_fresh_data_key_per_artifact(tmp_path: Path) -> None:
    sealed = ONLY_K1.encrypt(PLAINTEXT, "model.onnx")
    again = ONLY_K1.encrypt(PLAINTEXT, "model.onnx")
    assert sealed.startswith(MAGIC) and PLAINTEXT[:20] not in sealed
    _, header = _header(sealed)
    assert set(header) == {"v", "alg", "kek_id", "wrapped_key", "wrap_nonce", "nonce", "name"}
    assert (header["v"], header["alg"], header["kek_id"], header["name"]) == (1, "AES-256-GCM", "k1", "model.onnx")
    assert header["wrapped_key"] != _header(again)[1]["wrapped_key"] and sealed[-32:] != again[-32:]
    assert ONLY_K1.decrypt(tmp_path / "model.onnx.enc", sealed) == PLAINTEXT
    assert BOTH.decrypt(tmp_path / "model.onnx.enc", BOTH.encrypt(b"", "model.onnx")) == b""
    assert _header(BOTH.encrypt(b"x", "model.onnx"))[1]["kek_id"] == "k2"  # the primary: the last one listed


def _tampered(kind: str, data: bytes) -> bytes:
    start, _ = _header(data)
    if kind == "header name":  # one byte of the name: the payload's AAD no longer matches
        return data.replace(b'"name":"model.onnx"', b'"name":"model.onnX"')
    if kind == "header version":
        return data.replace(b'"v":1', b'"v":2')
    if kind == "wrapped key":  # one base64 character of it: still 48 bytes, no longer the wrapped key
        at = data.index(b'"wrapped_key":"') + len(b'"wrapped_key":"')
        return data[:at] + (b"C" if data[at : at + 1] == b"B" else b"B") + data[at + 1 :]
    if kind == "payload":
        return data[:-40] + bytes([data[-40] ^ 0x01]) + data[-39:]
    if kind == "truncated payload":
        return data[:-1]
    if kind == "truncated header":
        return data[: start + 5]
    if kind == "not ours":
        return b"PK\x03\x04" + data[4:]
    if kind == "future format":
        return b"DHOWENC2" + data[8:]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("header name", "failed its integrity check: the file was altered"),
        ("header version", "unsupported version 2"),
        ("wrapped key", "key 'k1' cannot unwrap its data key: wrong key material for that id, or the header was"),
        ("payload", "failed its integrity check: the file was altered"),
        ("truncated payload", "failed its integrity check: the file was altered (or cut short)"),
        ("truncated header", "truncated"),
        ("not ours", "not a dhow encrypted artifact"),
        ("future format", "unsupported encrypted-artifact format"),
    ],
)
def test_an_altered_artifact_is_refused_with_its_reason(tmp_path: Path, kind: str, reason: str) -> None:
    sealed = _tampered(kind, ONLY_K1.encrypt(PLAINTEXT, "model.onnx"))
    path = tmp_path / "model.onnx.enc"
    with pytest.raises(ModelLoadError) as caught:
        ONLY_K1.decrypt(path, sealed)
    assert caught.value.message.startswith(f"{path}: ") and reason in caught.value.message


def test_a_key_id_that_is_not_configured(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"encrypted with key 'k1', which is not configured \(configured: k2\)"):
        ONLY_K2.decrypt(tmp_path / "model.pt.enc", ONLY_K1.encrypt(PLAINTEXT, "model.pt"))


def test_wrong_key_material_under_the_right_id(tmp_path: Path) -> None:
    impostor = _keyring(f"k1:{K2}")
    with pytest.raises(ModelLoadError, match="key 'k1' cannot unwrap its data key: wrong key material"):
        impostor.decrypt(tmp_path / "model.pt.enc", ONLY_K1.encrypt(PLAINTEXT, "model.pt"))


def test_a_renamed_artifact_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"was encrypted as 'model\.py'; rename it back to 'model\.py\.enc'"):
        ONLY_K1.decrypt(tmp_path / "model.pt.enc", ONLY_K1.encrypt(PLAINTEXT, "model.py"))


def test_rewrap_moves_the_data_key_and_leaves_the_payload(tmp_path: Path) -> None:
    sealed = BOTH.encrypt(PLAINTEXT, "model.txt", "k1")
    moved = BOTH.rewrap(sealed, "k2")
    assert _header(moved)[1]["kek_id"] == "k2" and moved[-len(PLAINTEXT) - 16 :] == sealed[-len(PLAINTEXT) - 16 :]
    assert ONLY_K2.decrypt(tmp_path / "model.txt.enc", moved) == PLAINTEXT
    with pytest.raises(ModelLoadError, match="encrypted with key 'k2', which is not configured"):
        ONLY_K1.decrypt(tmp_path / "model.txt.enc", moved)
    with pytest.raises(InvalidInput, match="key 'k3' is not configured"):
        BOTH.rewrap(sealed, "k3")
    with pytest.raises(ModelLoadError, match="encrypted with key 'k1'"):
        ONLY_K2.rewrap(sealed, "k2")  # the old key is needed to unwrap


# -- keyrings ----------------------------------------------------------------------------------


def test_keyring_reads_commas_newlines_and_comments() -> None:
    keyring = Keyring.parse(f"# rotated 2025\nold:{K1}, k.2-x_y:{K2}  # current\n\n", "keys.txt")
    assert dict(keyring.keys) == {"old": base64.b64decode(K1), "k.2-x_y": base64.b64decode(K2)}
    assert keyring.primary == "k.2-x_y"
    assert K1 not in repr(keyring) and str(base64.b64decode(K1)) not in repr(keyring)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (f"k1{K1}", "keys.txt, entry 1: expected 'id:base64key'"),
        (f"k1:{K1}\nbad id:{K2}", "keys.txt, entry 2: key id must be 1 to 64 letters"),
        (f"k1:{K1}, k2:{K2[:-2]}!!", "keys.txt, entry 2 (key 'k2'): the key is not valid base64"),
        (f"k1:{base64.b64encode(b'x' * 16).decode()}", "entry 1 (key 'k1'): the key decodes to 16 bytes"),
        (f"k1:{K1}\nk1:{K2}", "entry 2: key id 'k1' is listed twice with different keys"),
        ("# nothing\n\n , ", "keys.txt: no key-encryption keys"),
    ],
)
def test_keyring_errors_name_the_entry_and_never_the_key(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        Keyring.parse(text, "keys.txt")
    assert fragment in caught.value.message
    for secret in (K1, K2, K2[:-2]):
        assert secret not in caught.value.message


def test_keyring_load_merges_the_file_then_the_environment(tmp_path: Path) -> None:
    assert Keyring.load("", "") is None
    keyfile = tmp_path / "kek.txt"
    keyfile.write_text(f"k1:{K1}\n")
    merged = Keyring.load(f"k2:{K2}", str(keyfile))
    assert merged is not None and list(merged.keys) == ["k1", "k2"] and merged.primary == "k2"
    from_file = Keyring.load("", str(keyfile))
    assert from_file is not None and from_file.primary == "k1"
    with pytest.raises(InvalidInput, match="different keys"):
        Keyring.load(f"k1:{K2}", str(keyfile))
    with pytest.raises(InvalidInput, match="cannot read the key file"):
        Keyring.load("", str(tmp_path / "missing.txt"))


# -- the repository ----------------------------------------------------------------------------


def _small_repository(root: Path) -> Path:
    for model in ("alpha", "beta"):
        (root / model / "1" / "sub").mkdir(parents=True)
        (root / model / "model.yaml").write_text("runtime: lightgbm\n")
        (root / model / "1" / "model.txt").write_text(f"{model} v1")
        (root / model / "1" / "sub" / "vocab.bin").write_bytes(b"\x00\x01")
    (root / "alpha" / "2").mkdir()
    (root / "alpha" / "2" / "model.txt").write_text("alpha v2")
    (root / "alpha" / "2" / "model.txt").chmod(0o640)
    (root / "alpha" / "notes").mkdir()
    (root / "alpha" / "notes" / "README").write_text("not a version")
    return root


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_encrypt_repository_writes_enc_files_and_removes_plaintext(tmp_path: Path) -> None:
    repository = _small_repository(tmp_path / "repo")
    assert len(encrypt_repository(repository, BOTH, model="beta", key_id="k1", keep_plaintext=True)) == 2
    assert {"beta/1/model.txt", "beta/1/model.txt.enc"} <= set(_files(repository))
    written = encrypt_repository(repository, BOTH)
    assert [p.relative_to(repository).as_posix() for p in written] == [
        "alpha/1/model.txt.enc",
        "alpha/1/sub/vocab.bin.enc",
        "alpha/2/model.txt.enc",
        "beta/1/model.txt.enc",  # the plaintext kept above is encrypted again
        "beta/1/sub/vocab.bin.enc",
    ]
    assert _files(repository) == [
        "alpha/1/model.txt.enc",
        "alpha/1/sub/vocab.bin.enc",
        "alpha/2/model.txt.enc",
        "alpha/model.yaml",
        "alpha/notes/README",
        "beta/1/model.txt.enc",
        "beta/1/sub/vocab.bin.enc",
        "beta/model.yaml",
    ]
    assert stat.S_IMODE((repository / "alpha" / "2" / "model.txt.enc").stat().st_mode) == 0o640
    assert BOTH.decrypt(repository / "alpha/2/model.txt.enc", (repository / "alpha/2/model.txt.enc").read_bytes()) == (
        b"alpha v2"
    )
    assert encrypt_repository(repository, BOTH) == []  # nothing left in plain
    with pytest.raises(NotFound, match="model 'gamma' is not in the repository"):
        encrypt_repository(repository, BOTH, model="gamma")
    with pytest.raises(InvalidInput, match="key 'k9' is not configured"):
        encrypt_repository(repository, BOTH, key_id="k9")


def test_rewrap_repository_rotates_every_artifact(tmp_path: Path) -> None:
    repository = _small_repository(tmp_path / "repo")
    encrypt_repository(repository, BOTH, key_id="k1")
    payloads = {p: p.read_bytes()[-18:] for p in repository.rglob("*.enc")}
    assert len(rewrap_repository(repository, BOTH, to_key_id="k2", model="alpha")) == 3
    assert len(rewrap_repository(repository, BOTH, to_key_id="k2")) == 2  # beta's; alpha's already moved
    assert rewrap_repository(repository, BOTH, to_key_id="k2") == []
    for path, tail in payloads.items():
        assert path.read_bytes()[-18:] == tail
        ONLY_K2.decrypt(path, path.read_bytes())
    assert not [p for p in repository.rglob("*") if p.name.endswith(".tmp")]


def test_artifact_digests_are_of_the_stored_files(tmp_path: Path) -> None:
    repository = _small_repository(tmp_path / "repo")
    plain = artifact_digests(repository / "alpha" / "1")
    assert plain == {
        "model.txt": hashlib.sha256(b"alpha v1").hexdigest(),
        "sub/vocab.bin": hashlib.sha256(b"\x00\x01").hexdigest(),
    }
    encrypt_repository(repository, BOTH)
    sealed = artifact_digests(repository / "alpha" / "1")
    stored = (repository / "alpha" / "1" / "sub" / "vocab.bin.enc").read_bytes()
    assert list(sealed) == ["model.txt.enc", "sub/vocab.bin.enc"]
    assert sealed["sub/vocab.bin.enc"] == hashlib.sha256(stored).hexdigest()


# -- the commands ------------------------------------------------------------------------------


def _command(*argv: str) -> int | None:
    parser = argparse.ArgumentParser(prog="dhow models")
    add_parsers(parser.add_subparsers(dest="models_command", required=True))
    return run(parser.parse_args(argv))


def test_commands_keygen_encrypt_and_rewrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DHOW_KEK", raising=False)
    repository, keyfile = _small_repository(tmp_path / "repo"), tmp_path / "kek.txt"
    assert _command("keygen", "--out", str(keyfile)) == 0 and _command("keygen", "--out", str(keyfile)) == 0
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert Keyring.load("", str(keyfile)) is not None and "added key 'k2'" in capsys.readouterr().out
    with pytest.raises(InvalidInput, match="already has a key 'k1'"):
        _command("keygen", "--out", str(keyfile), "--id", "k1")
    assert _command("keygen", "--id", "printed") == 0
    assert _keyring(capsys.readouterr().out).primary == "printed"

    with pytest.raises(InvalidInput, match="no key-encryption key: pass --kek-file FILE or set DHOW_KEK"):
        _command("encrypt", str(repository))
    assert _command("encrypt", str(repository), "--kek-file", str(keyfile), "--key-id", "k1") == 0
    assert capsys.readouterr().out == "encrypted 5 files of 2 models with key 'k1'\n"
    assert _command("rewrap", str(repository), "--kek-file", str(keyfile), "--to", "k2", "--model", "beta") == 0
    assert capsys.readouterr().out == "re-wrapped 2 files of 1 model under key 'k2'\n"

    monkeypatch.setenv("DHOW_KEK", f"env:{K1}")
    (repository / "beta" / "2").mkdir()
    (repository / "beta" / "2" / "model.txt").write_text("beta v2")
    assert _command("encrypt", str(repository), "--kek-file", str(keyfile)) == 0
    assert capsys.readouterr().out == "encrypted 1 file of 1 model with key 'env'\n"
    assert run(argparse.Namespace(command="models", models_command="validate")) is None  # not one of these


# -- every runtime, from ciphertext in memory --------------------------------------------------


@pytest.fixture(scope="module")
def encrypted_demo(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("encrypted") / "models"
    shutil.copytree(demo_repository, target)
    encrypt_repository(target, BOTH)
    return target


def _inputs(specs: tuple[TensorSpec, ...], rows: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = (rows, *spec.shape[1:])
        if spec.datatype == "BYTES":
            arrays[spec.name] = np.array([b"dhow", b"sail", b"x"] * (rows // 3), dtype=np.object_).reshape(shape)
        elif spec.datatype == "BOOL":
            arrays[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(NUMPY_DTYPE[spec.datatype])
    return arrays


def _loaded(folder: Path, config: ModelConfig, runtimes: list[Runtime]) -> Runtime:
    runtime = create_runtime(config.runtime)
    runtime.load(folder, config)
    runtimes.append(runtime)
    return runtime


@pytest.fixture
def runtimes() -> Iterator[list[Runtime]]:
    loaded: list[Runtime] = []
    yield loaded
    for runtime in loaded:
        runtime.unload()


def _assert_same_answers(plain: Runtime, sealed: Runtime) -> None:
    assert sealed.signature() == plain.signature()
    inputs = _inputs(plain.signature()[0])
    names = [spec.name for spec in plain.signature()[1]]
    want, got = plain.infer(inputs, names), sealed.infer(inputs, names)
    for name in names:
        assert got[name].tolist() == want[name].tolist(), name


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_every_runtime_loads_an_encrypted_artifact(
    demo_repository: Path, encrypted_demo: Path, decryptor: Keyring, runtimes: list[Runtime], model: str
) -> None:
    if model == "torch_mlp":
        pytest.importorskip("torch")
    config, folder = CONFIGS[model], encrypted_demo / model / "1"
    before = _files(folder)
    assert before and all(name.endswith(".enc") for name in before)
    plain = _loaded(demo_repository / model / "1", config, runtimes)
    _assert_same_answers(plain, _loaded(folder, config, runtimes))
    assert _files(folder) == before  # decrypted in memory: nothing written next to the ciphertext


def test_xgboost_ubj_loads_from_ciphertext(
    demo_repository: Path, tmp_path: Path, decryptor: Keyring, runtimes: list[Runtime]
) -> None:
    import xgboost

    booster = xgboost.Booster(model_file=str(demo_repository / "tabular_xgboost" / "1" / "model.json"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "sealed").mkdir()
    booster.save_model(str(tmp_path / "plain" / "model.ubj"))
    ubj = (tmp_path / "plain" / "model.ubj").read_bytes()
    (tmp_path / "sealed" / "model.ubj.enc").write_bytes(BOTH.encrypt(ubj, "model.ubj"))
    config = CONFIGS["tabular_xgboost"]
    _assert_same_answers(_loaded(tmp_path / "plain", config, runtimes), _loaded(tmp_path / "sealed", config, runtimes))


WHERE_MODEL = b"""
import inspect
import numpy as np

class Where:
    def load(self):
        pass

    def predict(self, inputs):
        code_file = inspect.currentframe().f_code.co_filename
        return {"where": np.array([[__file__.encode()], [code_file.encode()]], dtype=object)}
"""


def test_custom_python_source_keeps_its_file_name(tmp_path: Path, decryptor: Keyring, runtimes: list[Runtime]) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py.enc").write_bytes(BOTH.encrypt(WHERE_MODEL, "model.py"))
    spec = (TensorSpec("x", "FP32", (-1, 1)),), (TensorSpec("where", "BYTES", (-1, 1)),)
    runtime = _loaded(tmp_path / "1", ModelConfig("where", "python", *spec), runtimes)
    got = runtime.infer({"x": np.zeros((2, 1), np.float32)}, ["where"])["where"]
    assert got.reshape(-1).tolist() == [str(tmp_path / "1" / "model.py").encode()] * 2


def test_runtime_refusals_name_the_file(demo_repository: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tabular" / "1"
    shutil.copytree(demo_repository / "tabular" / "1", folder)
    sealed = folder / "model.onnx.enc"
    sealed.write_bytes(BOTH.encrypt((folder / "model.onnx").read_bytes(), "model.onnx"))
    config = CONFIGS["tabular"]
    with pytest.raises(ModelLoadError, match=r"both model\.onnx and model\.onnx\.enc are in .*delete the plaintext"):
        create_runtime("onnx").load(folder, config)
    (folder / "model.onnx").unlink()
    assert is_encrypted(sealed) and not is_encrypted(folder)
    with pytest.raises(ModelLoadError) as caught:
        create_runtime("onnx").load(folder, config)
    assert caught.value.message == (
        f"{sealed} is encrypted and no key-encryption key is configured: "
        "set DHOW_KEK or --kek-file to the keys it was encrypted with"
    )
    install_decryptor(ONLY_K1.decrypt)
    try:
        refusal = f"^{re.escape(str(sealed))}: encrypted with key 'k2', .*configured: k1"
        with pytest.raises(ModelLoadError, match=refusal):
            create_runtime("onnx").load(folder, config)
        install_decryptor(BOTH.decrypt)
        garbage = BOTH.encrypt(b"not an onnx graph", "model.onnx")
        sealed.write_bytes(garbage)
        with pytest.raises(ModelLoadError, match=r"cannot load model\.onnx\.enc: "):
            create_runtime("onnx").load(folder, config)
        assert read_artifact(sealed) == b"not an onnx graph"
    finally:
        install_decryptor(None)


# -- a real server -----------------------------------------------------------------------------


def _dhow_models(*argv: str) -> str:
    """``dhow models ...`` as an operator runs it; keys come from the key file only."""
    environment = {name: value for name, value in os.environ.items() if name != "DHOW_KEK"}
    done = subprocess.run(
        [sys.executable, "-m", "dhow.cli", "models", *argv], capture_output=True, text=True, env=environment, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _encrypted_server_repository(demo_repository: Path, root: Path, keyfile: Path) -> Path:
    repository = root / "models"
    for model in ("tabular", "text_python"):
        shutil.copytree(demo_repository / model, repository / model)
    shutil.copytree(demo_repository / "tabular", repository / "tabular_tampered")
    _dhow_models("keygen", "--out", str(keyfile))
    said = _dhow_models("encrypt", str(repository), "--kek-file", str(keyfile))
    assert said == "encrypted 5 files of 3 models with key 'k1'\n"
    artifact = repository / "tabular_tampered" / "2" / "model.onnx.enc"
    data = bytearray(artifact.read_bytes())
    data[-100] ^= 0x01
    artifact.write_bytes(bytes(data))
    return repository


def _probabilities(server: DhowProcess, model: str) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        tensor = httpclient.InferInput("input", [2, 32], "FP32")
        tensor.set_data_from_numpy(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32))
        answer: np.ndarray = client.infer(model, [tensor]).as_numpy("probabilities")
        return answer
    finally:
        client.close()


def _reasons(server: DhowProcess) -> dict[str, str]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return {row["name"]: row.get("reason", "") for row in client.get_model_repository_index()}
    finally:
        client.close()


def test_server_serves_an_encrypted_repository(
    demo_repository: Path, dhow_server: DhowProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DHOW_KEK", raising=False)
    keyfile = tmp_path / "kek.txt"
    repository = _encrypted_server_repository(demo_repository, tmp_path, keyfile)
    # "tabular_tampered" fails to load on purpose: ready means "the start-up loads were tried"
    server = start_dhow(repository, tmp_path, "--kek-file", str(keyfile), "--strict-readiness", "false")
    try:
        np.testing.assert_array_equal(_probabilities(server, "tabular"), _probabilities(dhow_server, "tabular"))
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert client.is_model_ready("text_python") and not client.is_model_ready("tabular_tampered")
        finally:
            client.close()
        reason = _reasons(server)["tabular_tampered"]
        assert "failed its integrity check" in reason, reason
        assert "tabular_tampered/2/model.onnx.enc: failed its integrity check" in server.log()
    finally:
        assert server.stop() == 0, server.log()
    (tmp_path / "unkeyed").mkdir()
    unkeyed = start_dhow(repository, tmp_path / "unkeyed", "--strict-readiness", "false")
    try:
        assert "tabular" not in {row["name"] for row in _ready_rows(unkeyed)}
        message = "tabular/2/model.onnx.enc is encrypted and no key-encryption key is configured"
        assert message in unkeyed.log() and message in _reasons(unkeyed)["tabular"]
    finally:
        assert unkeyed.stop() == 0, unkeyed.log()


def _ready_rows(server: DhowProcess) -> list[dict[str, str]]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        return [row for row in client.get_model_repository_index() if row.get("state") == "READY"]
    finally:
        client.close()


def test_commands_find_the_key_file_as_the_server_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DHOW_KEK", raising=False)
    monkeypatch.delenv("DHOW_KEK_FILE", raising=False)
    repository, keyfile = _small_repository(tmp_path / "repo"), tmp_path / "kek.txt"
    assert _command("keygen", "--out", str(keyfile), "--id", "from-file") == 0
    config = tmp_path / "dhow.yaml"
    config.write_text(f"kek_file: {keyfile}\n")
    assert _command("encrypt", str(repository), "--model", "alpha", "--config", str(config)) == 0
    assert capsys.readouterr().out.endswith("with key 'from-file'\n")
    other = tmp_path / "other.txt"
    assert _command("keygen", "--out", str(other), "--id", "from-env") == 0
    monkeypatch.setenv("DHOW_KEK_FILE", str(other))  # the environment over the file
    assert _command("encrypt", str(repository), "--model", "beta", "--config", str(config)) == 0
    assert capsys.readouterr().out.endswith("with key 'from-env'\n")
