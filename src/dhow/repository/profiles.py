"""A version's reference profile: ``<repo>/<model>/<version>/profile.json`` (``profile.json.enc`` at rest).

The profile is a file of the version like its artifacts, so everything that holds for them holds for it: it
travels with the version, ``dhow models encrypt`` encrypts it (its categories and quantiles are values of the
training data), ``dhow models trust`` records its digest, and a change of it reloads the version under
``--model-control poll``. A version without one still serves; it is just not scored for drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dhow.core.artifacts import ENCRYPTED_SUFFIX, read_artifact
from dhow.core.errors import InvalidInput, ModelLoadError
from dhow.repository.encryption import Keyring, write_atomically

__all__ = ["PROFILE", "read_profile", "write_profile"]

PROFILE = "profile.json"


def read_profile(version_dir: Path, where: str = "") -> dict[str, Any] | None:
    """The version's profile as stored (decrypted in memory when encrypted); None when it has none. Refusals
    name the file as ``where/<file>`` (e.g. ``tabular/2``: the repository's folders are not a client's business)."""
    plain, sealed = version_dir / PROFILE, version_dir / (PROFILE + ENCRYPTED_SUFFIX)
    path = sealed if sealed.is_file() else plain if plain.is_file() else None
    if path is None:
        return None
    name = f"{where}/{path.name}" if where else str(path)
    try:
        data = json.loads(read_artifact(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{name}: not a profile written by 'dhow models profile' ({exc})") from None
    except ModelLoadError as exc:
        raise ModelLoadError(exc.message.replace(str(path), name)) from None
    if not isinstance(data, dict) or not isinstance(data.get("features"), dict):
        raise ModelLoadError(f"{name}: not a profile written by 'dhow models profile' (no 'features' object)")
    return data


def write_profile(version_dir: Path, profile: dict[str, Any], keyring: Keyring | None) -> Path:
    """Write the profile beside the version's artifacts: encrypted when they are (which needs the keyring)."""
    if not version_dir.is_dir():
        raise InvalidInput(f"{version_dir} is not a version folder")
    encrypted = any(p.name.endswith(ENCRYPTED_SUFFIX) for p in version_dir.iterdir() if p.name != PROFILE)
    data = json.dumps(profile, separators=(",", ":")).encode()
    plain, sealed = version_dir / PROFILE, version_dir / (PROFILE + ENCRYPTED_SUFFIX)
    if encrypted:
        if keyring is None:
            raise InvalidInput(
                f"the artifacts of {version_dir} are encrypted, so its profile must be too: pass --kek-file FILE "
                "or set DHOW_KEK=id:base64key (the keys the server uses)"
            )
        write_atomically(sealed, keyring.encrypt(data, PROFILE), mode=0o600)
        plain.unlink(missing_ok=True)
        return sealed
    write_atomically(plain, data)
    sealed.unlink(missing_ok=True)
    return plain
