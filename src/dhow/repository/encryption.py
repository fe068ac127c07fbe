"""Envelope encryption of model artifacts at rest: AES-256-GCM data keys wrapped by key-encryption keys.

An encrypted artifact ``<name>.enc`` is::

    b"DHOWENC1" | header length (4 bytes, big-endian) | JSON header | ciphertext + 16-byte tag

The header says which key-encryption key (KEK) wraps the artifact's own random data key (DEK)::

    {"v": 1, "alg": "AES-256-GCM", "kek_id": "k1", "wrapped_key": b64, "wrap_nonce": b64, "nonce": b64,
     "name": "model.onnx"}

The DEK is wrapped with AES-256-GCM under the KEK (AAD: the kek_id). The payload's AAD is the magic and
the header without its three wrapping fields, so that ``rewrap`` can move the DEK under another KEK
(key rotation) without re-encrypting the payload; the wrapping fields are authenticated by the wrap
itself. Altering any byte of the header therefore fails one of the two tag checks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dhow.core.artifacts import ENCRYPTED_SUFFIX, plain_path
from dhow.core.errors import InvalidInput, ModelLoadError, NotFound
from dhow.repository.store import ModelRepository

__all__ = [
    "ALGORITHM",
    "MAGIC",
    "Keyring",
    "artifact_digests",
    "encrypt_repository",
    "generate_key",
    "rewrap_repository",
    "trusted_files",
    "write_atomically",
]

MAGIC = b"DHOWENC1"
ALGORITHM = "AES-256-GCM"
_VERSION = 1
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PREFIX = struct.Struct(">I")
# a header is a few hundred bytes; a huge length means the file is not ours or was damaged
_MAX_HEADER = 64 * 1024
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_WRAP_FIELDS = ("kek_id", "wrapped_key", "wrap_nonce")


@dataclass(frozen=True, slots=True)
class _Sealed:
    """A parsed encrypted artifact: its header fields and the ciphertext with its tag."""

    header: dict[str, Any]
    payload: bytes

    @property
    def kek_id(self) -> str:
        return str(self.header["kek_id"])

    def payload_aad(self) -> bytes:
        bound = {key: value for key, value in self.header.items() if key not in _WRAP_FIELDS}
        return MAGIC + json.dumps(bound, sort_keys=True, separators=(",", ":")).encode()

    def to_bytes(self) -> bytes:
        header = json.dumps(self.header, separators=(",", ":")).encode()
        return MAGIC + _PREFIX.pack(len(header)) + header + self.payload


@dataclass(frozen=True, slots=True)
class Keyring:
    """Key-encryption keys by id; new encryptions use ``primary``, the last one listed."""

    # never in a repr: a keyring ends up in logs and tracebacks
    keys: Mapping[str, bytes] = field(repr=False)
    primary: str

    @classmethod
    def parse(cls, text: str, source: str) -> Keyring:
        """Read ``id:base64key`` entries separated by commas or newlines; ``#`` starts a comment."""
        keys: dict[str, bytes] = {}
        entries = [item.strip() for line in text.splitlines() for item in line.partition("#")[0].split(",")]
        for number, entry in enumerate((item for item in entries if item), start=1):
            key_id, key = _parse_entry(entry, f"{source}, entry {number}")
            if keys.get(key_id, key) != key:
                raise InvalidInput(f"{source}, entry {number}: key id '{key_id}' is listed twice with different keys")
            keys.pop(key_id, None)  # a repeated id moves to the end: it is the later listing that counts
            keys[key_id] = key
        if not keys:
            raise InvalidInput(f"{source}: no key-encryption keys; expected entries like 'k1:<base64 of 32 bytes>'")
        return cls(keys, next(reversed(keys)))

    @classmethod
    def load(cls, kek: str, kek_file: str) -> Keyring | None:
        """The keys of ``kek_file`` then ``kek`` (DHOW_KEK), merged; ``None`` when neither is set."""
        parts: list[Keyring] = []
        if kek_file:
            try:
                text = Path(kek_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidInput(f"cannot read the key file {kek_file}: {exc}") from None
            parts.append(cls.parse(text, kek_file))
        if kek.strip():
            parts.append(cls.parse(kek, "DHOW_KEK"))
        if not parts:
            return None
        merged: dict[str, bytes] = {}
        for part in parts:
            for key_id, key in part.keys.items():
                if merged.get(key_id, key) != key:
                    raise InvalidInput(f"key id '{key_id}' has different keys in {kek_file} and DHOW_KEK")
                merged.pop(key_id, None)
                merged[key_id] = key
        return cls(merged, parts[-1].primary)

    def key(self, key_id: str | None) -> tuple[str, bytes]:
        """The id and material of ``key_id`` (the primary when ``None``), for encrypting."""
        chosen = self.primary if key_id is None else key_id
        if chosen not in self.keys:
            raise InvalidInput(f"key '{chosen}' is not configured (configured: {self._ids()})")
        return chosen, self.keys[chosen]

    def encrypt(self, plaintext: bytes, name: str, key_id: str | None = None) -> bytes:
        """An encrypted artifact of ``plaintext``, saved as ``<name>.enc``, under a fresh data key."""
        kek_id, kek = self.key(key_id)
        dek = AESGCM.generate_key(bit_length=256)
        wrap_nonce, nonce = os.urandom(_NONCE_BYTES), os.urandom(_NONCE_BYTES)
        header = {
            "v": _VERSION,
            "alg": ALGORITHM,
            "kek_id": kek_id,
            "wrapped_key": _b64(AESGCM(kek).encrypt(wrap_nonce, dek, kek_id.encode())),
            "wrap_nonce": _b64(wrap_nonce),
            "nonce": _b64(nonce),
            "name": name,
        }
        sealed = _Sealed(header, b"")
        return _Sealed(header, AESGCM(dek).encrypt(nonce, plaintext, sealed.payload_aad())).to_bytes()

    def decrypt(self, path: Path, data: bytes) -> bytes:
        """The plaintext of the encrypted artifact ``data`` read from ``path``; ``ModelLoadError`` says why not."""
        sealed = _parse(data, str(path))
        dek = self._unwrap(sealed, str(path))
        nonce = _field(sealed.header, "nonce", str(path))
        try:
            plaintext = AESGCM(dek).decrypt(nonce, sealed.payload, sealed.payload_aad())
        except InvalidTag:
            raise ModelLoadError(
                f"{path}: failed its integrity check: the file was altered (or cut short) after encryption"
            ) from None
        name = sealed.header["name"]  # authenticated now
        if path.name.endswith(ENCRYPTED_SUFFIX) and plain_path(path).name != name:
            # an artifact renamed would be read by the wrong runtime, or as another file of the model
            raise ModelLoadError(f"{path}: was encrypted as '{name}'; rename it back to '{name}{ENCRYPTED_SUFFIX}'")
        return plaintext

    def rewrap(self, data: bytes, to_key_id: str) -> bytes:
        """``data`` with its data key wrapped under ``to_key_id`` instead; the payload is left as it is."""
        return self._rewrap(data, to_key_id, "the artifact")

    def _rewrap(self, data: bytes, to_key_id: str, label: str) -> bytes:
        kek_id, kek = self.key(to_key_id)
        sealed = _parse(data, label)
        dek = self._unwrap(sealed, label)
        wrap_nonce = os.urandom(_NONCE_BYTES)
        wrapped = AESGCM(kek).encrypt(wrap_nonce, dek, kek_id.encode())
        header = {**sealed.header, "kek_id": kek_id, "wrapped_key": _b64(wrapped), "wrap_nonce": _b64(wrap_nonce)}
        return _Sealed(header, sealed.payload).to_bytes()

    def _unwrap(self, sealed: _Sealed, label: str) -> bytes:
        kek_id = sealed.kek_id
        if kek_id not in self.keys:
            raise ModelLoadError(
                f"{label}: encrypted with key '{kek_id}', which is not configured (configured: {self._ids()})"
            )
        wrapped, wrap_nonce = _field(sealed.header, "wrapped_key", label), _field(sealed.header, "wrap_nonce", label)
        try:
            return AESGCM(self.keys[kek_id]).decrypt(wrap_nonce, wrapped, kek_id.encode())
        except InvalidTag:
            raise ModelLoadError(
                f"{label}: key '{kek_id}' cannot unwrap its data key: "
                "wrong key material for that id, or the header was altered"
            ) from None

    def _ids(self) -> str:
        return ", ".join(self.keys) or "none"


def generate_key() -> str:
    """A new key-encryption key: base64 of 32 random bytes."""
    return _b64(secrets.token_bytes(_KEY_BYTES))


def encrypt_repository(
    repository: Path,
    keyring: Keyring,
    *,
    model: str | None = None,
    key_id: str | None = None,
    keep_plaintext: bool = False,
) -> list[Path]:
    """Encrypt every artifact of every version folder as ``<file>.enc``; returns the files written.

    model.yaml stays readable; ``*.enc`` files are skipped. Each file is written atomically, then the
    plaintext is removed unless ``keep_plaintext`` (a served folder must not hold both).
    """
    kek_id, _ = keyring.key(key_id)
    written: list[Path] = []
    for path in _version_files(repository, model):
        if path.name.endswith(ENCRYPTED_SUFFIX):
            continue
        target = path.with_name(path.name + ENCRYPTED_SUFFIX)
        write_atomically(target, keyring.encrypt(path.read_bytes(), path.name, kek_id), like=path)
        if not keep_plaintext:
            path.unlink()
            _sync_folder(path.parent)
        written.append(target)
    return written


def rewrap_repository(repository: Path, keyring: Keyring, *, to_key_id: str, model: str | None = None) -> list[Path]:
    """Wrap the data key of every encrypted artifact under ``to_key_id``; returns the files rewritten."""
    keyring.key(to_key_id)
    rewritten: list[Path] = []
    for path in _version_files(repository, model):
        if not path.name.endswith(ENCRYPTED_SUFFIX):
            continue
        data = path.read_bytes()
        if _parse(data, str(path)).kek_id == to_key_id:
            continue
        write_atomically(path, keyring._rewrap(data, to_key_id, str(path)), like=path)
        rewritten.append(path)
    return rewritten


def artifact_digests(version_dir: Path) -> dict[str, str]:
    """SHA-256 (hex) of every file under a version folder, by relative POSIX path, as stored on disk."""
    digests: dict[str, str] = {}
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        with path.open("rb") as file:
            digests[path.relative_to(version_dir).as_posix()] = hashlib.file_digest(file, "sha256").hexdigest()
    return digests


def _parse_entry(entry: str, where: str) -> tuple[str, bytes]:
    key_id, colon, encoded = (part.strip() for part in entry.partition(":"))
    if not colon:
        raise InvalidInput(f"{where}: expected 'id:base64key', found no ':'")
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidInput(f"{where}: key id must be 1 to 64 letters, digits, '.', '_' or '-'")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where} (key '{key_id}'): the key is not valid base64") from None
    if len(key) != _KEY_BYTES:
        raise InvalidInput(
            f"{where} (key '{key_id}'): the key decodes to {len(key)} bytes; AES-256 needs exactly 32 "
            "(make one with 'dhow models keygen')"
        )
    return key_id, key


def _parse(data: bytes, label: str) -> _Sealed:
    if not data.startswith(MAGIC):
        if data.startswith(MAGIC[:-1]):
            raise ModelLoadError(
                f"{label}: unsupported encrypted-artifact format {data[:8]!r}; this dhow reads {MAGIC!r}"
            )
        raise ModelLoadError(f"{label}: not a dhow encrypted artifact (it does not start with {MAGIC.decode()})")
    start = len(MAGIC) + _PREFIX.size
    if len(data) < start:
        raise ModelLoadError(f"{label}: truncated: {len(data)} bytes, too short for the header")
    (length,) = _PREFIX.unpack_from(data, len(MAGIC))
    if length > _MAX_HEADER:
        raise ModelLoadError(f"{label}: damaged: the header claims {length} bytes")
    if len(data) < start + length + _TAG_BYTES:
        raise ModelLoadError(f"{label}: truncated: {len(data)} bytes, shorter than its header and tag")
    try:
        header = json.loads(data[start : start + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"{label}: the header is not valid JSON: the file was altered") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{label}: the header is not a JSON object: the file was altered")
    if header.get("v") != _VERSION or header.get("alg") != ALGORITHM:
        raise ModelLoadError(
            f"{label}: unsupported version {header.get('v')!r} / algorithm {header.get('alg')!r}; "
            f"this dhow reads version {_VERSION} with {ALGORITHM}"
        )
    for name in ("kek_id", "name"):
        if not isinstance(header.get(name), str):
            raise ModelLoadError(f"{label}: the header's '{name}' is missing or not a string: the file was altered")
    return _Sealed(header, data[start + length :])


def _field(header: Mapping[str, Any], name: str, label: str) -> bytes:
    """A base64 field of the header, decoded, with the nonce and key sizes AES-GCM expects."""
    expected = _NONCE_BYTES if name.endswith("nonce") else _KEY_BYTES + _TAG_BYTES
    value = header.get(name)
    try:
        decoded = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != expected:
        raise ModelLoadError(f"{label}: the header's '{name}' is malformed: the file was altered")
    return decoded


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _version_files(repository: Path, model: str | None) -> Iterator[Path]:
    """Every file under the integer version folders of the repository's models (or of one)."""
    if not repository.is_dir():
        raise InvalidInput(f"the model repository {repository} is not a folder")
    names = ModelRepository(repository).model_names()
    if model is not None:
        if model not in names:
            raise NotFound(
                f"model '{model}' is not in the repository {repository} (models: {', '.join(names) or 'none'})"
            )
        names = [model]
    for name in names:
        folders = sorted((p for p in (repository / name).iterdir() if p.is_dir() and p.name.isdigit()), key=_number)
        for folder in folders:
            yield from sorted(p for p in folder.rglob("*") if p.is_file() and not _is_leftover(p))


def _number(path: Path) -> int:
    return int(path.name)


def _is_leftover(path: Path) -> bool:
    # a temporary file of an interrupted run (see _write_atomically): ciphertext, never an artifact
    return path.name.startswith(".") and path.name.endswith(".tmp")


def write_atomically(target: Path, data: bytes, *, like: Path | None = None, mode: int = 0o644) -> None:
    """Write ``target`` so that readers see the old file or the new one, never a part (same mode as ``like``,
    else ``mode``)."""
    mode = stat.S_IMODE(like.stat().st_mode) if like is not None else mode
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)


def _sync_folder(folder: Path) -> None:
    # the rename (or unlink) is durable only once the folder's entry is on disk too
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def trusted_files(version_dir: Path) -> dict[str, str]:
    """What ``--require-digests`` checks: the version's files, and the model's ``model.yaml`` (which decides the
    model's tenant, region and masking rules, so it must not change unseen either)."""
    digests = artifact_digests(version_dir)
    manifest = version_dir.parent / "model.yaml"
    if manifest.is_file():
        digests["../model.yaml"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    return digests
