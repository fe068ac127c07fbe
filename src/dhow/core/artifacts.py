"""Reading model artifacts that may be encrypted at rest (``<name>.enc``).

Runtimes may import only ``dhow.core``, so the hook lives here: the server installs the keyring's
``decrypt`` at start, and a runtime asks ``read_artifact`` for the plaintext, which stays in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dhow.core.errors import ModelLoadError

__all__ = [
    "ENCRYPTED_SUFFIX",
    "Decryptor",
    "install_decryptor",
    "installed_decryptor",
    "is_encrypted",
    "plain_path",
    "read_artifact",
]

ENCRYPTED_SUFFIX = ".enc"

#: (path of the encrypted file, its bytes) -> plaintext; raises ``ModelLoadError`` naming the file
Decryptor = Callable[[Path, bytes], bytes]

# process-wide: one server, one keyring; a worker process must install its own
_decryptor: Decryptor | None = None


def install_decryptor(fn: Decryptor | None) -> None:
    """Decrypt ``*.enc`` artifacts with ``fn`` from now on; ``None`` uninstalls it."""
    global _decryptor
    _decryptor = fn


def installed_decryptor() -> Decryptor | None:
    """The decryptor installed now: what a worker process is handed at start, to install as its own."""
    return _decryptor


def is_encrypted(path: Path) -> bool:
    return path.name.endswith(ENCRYPTED_SUFFIX) and len(path.name) > len(ENCRYPTED_SUFFIX)


def plain_path(path: Path) -> Path:
    """``model.onnx`` for ``model.onnx.enc``: the name the artifact had before it was encrypted."""
    return path.with_name(path.name.removesuffix(ENCRYPTED_SUFFIX)) if is_encrypted(path) else path


def read_artifact(path: Path) -> bytes:
    """The bytes of a plain artifact, or the decrypted plaintext of an encrypted one (never written to disk)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not is_encrypted(path):
        return data
    decryptor = _decryptor
    if decryptor is None:
        raise ModelLoadError(
            f"{path} is encrypted and no key-encryption key is configured: "
            "set DHOW_KEK or --kek-file to the keys it was encrypted with"
        )
    return decryptor(path, data)
