"""A model repository in object storage (``s3://bucket/prefix``; ``gs://``, ``az://`` and the other fsspec
protocols by the same door), mirrored into a local cache that the server reads as it reads a folder.

The bucket holds the folder layout (``<model>/model.yaml``, ``<model>/<version>/…``) and, per version, a
digest list beside the version folder, ``<model>/<version>.sha256``, in ``sha256sum``'s format (``HEX  PATH``
per file, paths relative to the version folder). The digest list is the version's commit mark: it is uploaded
last (``dhow models push`` does), and a version without one is not mirrored (it is still being uploaded).
Each file is downloaded into a folder beside the cache, its SHA-256 checked against the list while it
streams, and the whole version is renamed into place in one step; a mismatch, a missing or an unlisted file
refuses the version, naming the file. Files are copied as they are: encrypted artifacts (``*.enc``) stay
encrypted in the cache and are decrypted in memory when loaded, as from a folder.

``refresh`` runs at start and, under ``--model-control poll``, before each scan, so that a version uploaded
to the bucket is served by every replica without a restart or a shared volume. Several processes sharing a
cache (``--workers``) take turns through a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec

from dhow.core.errors import DhowError, InvalidInput
from dhow.core.names import check_model_name
from dhow.repository.manifest import MANIFEST
from dhow.repository.store import ModelRepository

__all__ = ["DIGEST_SUFFIX", "MirroredRepository", "push_repository", "read_digest_list"]

log = logging.getLogger("dhow.repository")

DIGEST_SUFFIX = ".sha256"
_STATE = ".dhow-mirror.json"
_LOCK = ".dhow-mirror.lock"
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_CHUNK = 1 << 20


def read_digest_list(text: str, where: str) -> dict[str, str]:
    """``sha256sum`` output as ``{relative path: hex digest}``; a path leaving the version folder is refused."""
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            raise InvalidInput(f"{where} line {number}: expected 'SHA256HEX  PATH' (sha256sum's format), got {line!r}")
        path = PurePosixPath(match.group(2).removeprefix("./"))
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise InvalidInput(f"{where} line {number}: the path {match.group(2)!r} leaves the version folder")
        digests[path.as_posix()] = match.group(1).lower()
    if not digests:
        raise InvalidInput(f"{where}: the digest list is empty")
    return digests


class MirroredRepository(ModelRepository):
    """The repository at ``url``, read from its copy in ``cache`` (brought up to date by ``refresh``)."""

    def __init__(self, url: str, cache: Path) -> None:
        super().__init__(cache)
        self.url = url.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise InvalidInput(f"cannot use the repository {url}: {exc}") from None
        self.base = self.base.rstrip("/")

    def refresh(self) -> list[str]:
        """Bring the cache up to date with the bucket; what changed, in words (refusals are logged and skipped).

        Raises ``DhowError`` when the bucket cannot be listed and the cache holds nothing to serve.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with _locked(self.root / _LOCK):
            try:
                listing = self._listing()
            except Exception as exc:  # the store's client has errors of its own (botocore's are not OSError)
                message = f"cannot list the repository {self.url}: {exc}"
                if not self.model_names():
                    raise DhowError(
                        f"{message}; the cache {self.root} is empty, so there is nothing to serve"
                    ) from None
                log.error("%s; serving the cached copy in %s", message, self.root)
                return []
            return self._apply(listing)

    def _listing(self) -> dict[str, dict[str, Any]]:
        """Every object under the prefix, by path relative to it."""
        self.fs.invalidate_cache()
        found = self.fs.find(self.base, detail=True)
        prefix = self.base + "/"
        return {path[len(prefix) :]: info for path, info in found.items() if path.startswith(prefix)}

    def _apply(self, listing: dict[str, dict[str, Any]]) -> list[str]:
        state = self._read_state()
        changes: list[str] = []
        mirrored: dict[str, Any] = state.setdefault("models", {})
        models = {key.split("/")[0] for key in listing if key.endswith("/" + MANIFEST) and key.count("/") == 1}
        if not models:
            log.warning("repository %s holds no model (no <model>/%s under it): nothing to serve", self.url, MANIFEST)
        for name in sorted(models):
            try:
                check_model_name(name)
            except DhowError as exc:
                log.error("repository %s: skipping the folder %r: %s", self.url, name, exc.message)
                continue
            try:
                changes += self._mirror_model(name, listing, mirrored.setdefault(name, {}))
            except Exception as exc:  # the store failing mid-way: what was mirrored stays, the next refresh goes on
                log.error("repository %s: model %s not mirrored: %s: %s", self.url, name, type(exc).__name__, exc)
        for name in sorted(set(mirrored) - models):
            shutil.rmtree(self.root / name, ignore_errors=True)
            del mirrored[name]
            changes.append(f"{name} removed")
        self._write_state(state)
        for change in changes:
            log.info("repository %s: %s", self.url, change)
        return changes

    def _mirror_model(self, name: str, listing: dict[str, dict[str, Any]], seen: dict[str, Any]) -> list[str]:
        changes: list[str] = []
        versions: dict[str, Any] = seen.setdefault("versions", {})
        marks = {
            key[len(name) + 1 : -len(DIGEST_SUFFIX)]: key
            for key in listing
            if key.startswith(name + "/") and key.endswith(DIGEST_SUFFIX) and key.count("/") == 1
        }
        committed = {number: key for number, key in marks.items() if number.isdigit()}
        for number, key in sorted(committed.items(), key=lambda item: int(item[0])):
            tag = _tag(listing[key])
            if versions.get(number) == tag and (self.root / name / number).is_dir():
                continue
            try:
                self._mirror_version(name, number, key, listing)
            except Exception as exc:  # a refusal (DhowError) or the store failing: the next refresh tries again
                why = exc.message if isinstance(exc, DhowError) else f"{type(exc).__name__}: {exc}"
                log.error("repository %s: version %s of %s not mirrored: %s", self.url, number, name, why)
                continue
            versions[number] = tag
            changes.append(f"{name} version {number} mirrored")
        for number in sorted(set(versions) - set(committed)):
            shutil.rmtree(self.root / name / number, ignore_errors=True)
            del versions[number]
            changes.append(f"{name} version {number} removed")
        manifest_key = f"{name}/{MANIFEST}"
        tag = _tag(listing[manifest_key])
        if seen.get("manifest") != tag or not (self.root / name / MANIFEST).is_file():
            # written after the versions, so that a new model appears with its versions in place
            self._download(manifest_key, self.root / name / MANIFEST, None)
            seen["manifest"] = tag
            changes.append(f"{name} model.yaml updated")
        return changes

    def _mirror_version(self, name: str, number: str, digest_key: str, listing: dict[str, dict[str, Any]]) -> None:
        where = f"{self.url}/{digest_key}"
        digests = read_digest_list(self.fs.cat_file(f"{self.base}/{digest_key}").decode(), where)
        folder = f"{name}/{number}/"
        present = {key[len(folder) :] for key in listing if key.startswith(folder)}
        unlisted = sorted(present - set(digests))
        if unlisted:
            raise DhowError(f"{folder}{unlisted[0]} is in the bucket but not in {where}: add it, or remove it")
        missing = sorted(set(digests) - present)
        if missing:
            raise DhowError(f"{folder}{missing[0]} is listed in {where} but not in the bucket")
        (self.root / name).mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(dir=self.root, prefix=f".incoming-{name}-{number}-"))
        try:
            for path, digest in sorted(digests.items()):
                self._download(folder + path, incoming / path, digest)
            target = self.root / name / number
            old = self.root / f".old-{name}-{number}"
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(incoming, target)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def _download(self, key: str, target: Path, digest: str | None) -> None:
        """Copy one object to ``target`` through a temporary file, checking its SHA-256 when ``digest`` is given."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self.fs.open(f"{self.base}/{key}", "rb") as source:
                while chunk := source.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
            if digest is not None and hasher.hexdigest() != digest:
                raise DhowError(
                    f"{key} does not match its digest (SHA-256 {hasher.hexdigest()[:16]}…, listed "
                    f"{digest[:16]}…): upload it again, then its digest list"
                )
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.root / _STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) and state.get("url") == self.url else {}

    def _write_state(self, state: dict[str, Any]) -> None:
        state["url"] = self.url
        path = self.root / _STATE
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)


def _tag(info: dict[str, Any]) -> str:
    """What changes when an object is replaced: its size and ETag (or modification time)."""
    stamp = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size')}:{stamp}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def push_repository(local: Path, url: str, *, model: str | None = None) -> list[str]:
    """Upload a repository folder (or one model of it) to object storage in the order a mirror reads safely:
    each version's files, then its digest list (the version's commit mark), then the model's model.yaml.
    A version whose digest list in the bucket is already the same is skipped; what was pushed, in words."""
    from dhow.repository.encryption import artifact_digests

    repository = ModelRepository(local)
    names = [model] if model is not None else repository.model_names()
    if not names:
        raise InvalidInput(f"{local}: no model folders with a model.yaml to push")
    try:
        fs, base = fsspec.core.url_to_fs(url.rstrip("/"))
    except (ImportError, ValueError) as exc:
        raise InvalidInput(f"cannot use the repository {url}: {exc}") from None
    base = base.rstrip("/")
    pushed: list[str] = []
    for name in names:
        source = repository.source(name)
        for number in source.versions:
            digests = artifact_digests(source.version_dir(number))
            listing = "".join(f"{digest}  {path}\n" for path, digest in sorted(digests.items()))
            mark = f"{base}/{name}/{number}{DIGEST_SUFFIX}"
            with contextlib.suppress(FileNotFoundError):
                if fs.cat_file(mark).decode() == listing:
                    continue
            for path in digests:
                fs.put_file(str(source.version_dir(number) / path), f"{base}/{name}/{number}/{path}")
            fs.pipe_file(mark, listing.encode())
            pushed.append(f"{name} version {number}")
        fs.put_file(str(source.path / MANIFEST), f"{base}/{name}/{MANIFEST}")
    return pushed
