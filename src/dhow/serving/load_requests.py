"""What a load through the repository API asks for: a ``config`` override, merged over the model's
model.yaml, or a whole manifest with uploaded model files (``file:<version>/<name>``), written into the
upload folder.

A client's mistake in either is a bad request (400, gRPC INVALID_ARGUMENT), never "unavailable": retrying
the same request cannot succeed.
"""

from __future__ import annotations

import base64
import binascii
import shutil
from pathlib import Path
from typing import Any

import orjson

from dhow.core.errors import Forbidden, InvalidInput
from dhow.core.model_config import ModelConfig
from dhow.core.names import check_model_name
from dhow.repository.manifest import MANIFEST, ManifestError, parse_manifest

__all__ = ["PROTECTED_FIELDS", "overridden_manifest", "requested_manifest", "write_upload"]

#: what ``--require-digests`` protects through model.yaml's digest: who may use the model, where its data may
#: go, what is masked, which payloads the audit trail keeps and whether the payload log sees them; a config
#: override may not change them
PROTECTED_FIELDS = ("tenant", "region", "pii", "payload_sample_rate", "payload_log")


def requested_manifest(name: str, config_text: object) -> dict[str, Any]:
    """The whole manifest a load request's ``config`` parameter holds (an upload's), validated."""
    data = _config_fields(config_text)
    _parse(name, data, f"config parameter of the load request for '{name}'")
    return data


def overridden_manifest(
    name: str, on_disk: dict[str, Any], config_text: object, *, digests_required: bool
) -> dict[str, Any]:
    """model.yaml's fields with those the ``config`` parameter names put in their place, validated.

    A named field replaces model.yaml's whole (``batching: {...}`` replaces the block); ``null`` resets it
    to its default. With ``digests_required`` the result must keep model.yaml's ``PROTECTED_FIELDS``.
    """
    merged = {**on_disk, **_config_fields(config_text)}
    config = _parse(name, merged, f"config parameter of the load request for '{name}' (over {name}/{MANIFEST})")
    if digests_required:
        _check_protected(parse_manifest(on_disk, f"{name}/{MANIFEST}", name), config)
    return merged


def _config_fields(config_text: object) -> dict[str, Any]:
    if not isinstance(config_text, str):
        raise InvalidInput("load parameter 'config' must be a JSON string holding the model.yaml fields")
    try:
        data = orjson.loads(config_text)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"load parameter 'config' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"load parameter 'config' must be a JSON object of model.yaml fields, got {data!r}")
    return data


def _parse(name: str, data: dict[str, Any], where: str) -> ModelConfig:
    try:
        return parse_manifest(data, where, name)
    except ManifestError as exc:
        raise InvalidInput(exc.message) from None


def _check_protected(trusted: ModelConfig, wanted: ModelConfig) -> None:
    changes = [
        f"{field} (model.yaml: {getattr(trusted, field)!r}, config: {getattr(wanted, field)!r})"
        for field in PROTECTED_FIELDS
        if getattr(trusted, field) != getattr(wanted, field)
    ]
    if changes:
        raise Forbidden(
            f"model '{trusted.name}': with --require-digests a load's config may not change what the trusted "
            f"model.yaml decides: {'; '.join(changes)}. Change model.yaml and record it with 'dhow models trust' "
            "instead"
        )


def write_upload(upload_dir: Path, name: str, manifest: dict[str, Any], files: dict[str, Any]) -> None:
    """Write an uploaded model (its files and ``manifest`` as model.yaml) to ``upload_dir/name``, replacing
    what was there in one rename (blocking: call from a thread)."""
    target = _inside(upload_dir, check_model_name(name))
    staging = _inside(upload_dir, f".{name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    for relative, content in files.items():
        path = (staging / relative).resolve()
        parts = Path(relative).parts
        if not parts or not parts[0].isdigit() or ".." in parts or not path.is_relative_to(staging.resolve()):
            raise InvalidInput(f"file parameter 'file:{relative}' must be '<version>/<file name>'")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_decode_file(relative, content))
    (staging / MANIFEST).write_bytes(orjson.dumps(manifest))  # JSON is YAML
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused unless it is a child of ``folder``: uploads never write or delete elsewhere."""
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise InvalidInput(f"model name {name!r} leads outside the upload folder")
    return path


def _decode_file(relative: str, content: object) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        try:
            return base64.b64decode(content, validate=True)
        except binascii.Error:
            raise InvalidInput(f"file parameter 'file:{relative}' must be base64") from None
    raise InvalidInput(f"file parameter 'file:{relative}' must be base64 text or bytes")
