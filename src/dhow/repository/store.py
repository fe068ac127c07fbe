"""The model repository on disk: ``<repo>/<model>/model.yaml`` and ``<repo>/<model>/<version>/…``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhow.core.errors import unknown_model
from dhow.core.model_config import ModelConfig
from dhow.core.names import check_model_name
from dhow.repository.manifest import MANIFEST, read_manifest, read_manifest_data


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What the repository holds for one model: its config and the versions on disk."""

    name: str
    path: Path
    config: ModelConfig
    #: integer version folders present on disk, ascending
    versions: tuple[int, ...]

    def version_dir(self, version: int) -> Path:
        return self.path / str(version)

    def served_versions(self) -> list[int]:
        """The versions the manifest's version policy selects."""
        return self.config.version_policy.select(list(self.versions))


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def refresh(self) -> list[str]:
        """Bring the repository up to date before it is read (a folder is: nothing to do); what changed."""
        return []

    def model_names(self) -> list[str]:
        """Folders of the repository root that hold a model.yaml, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file() and not p.name.startswith("."))

    def has_model(self, name: str) -> bool:
        """Whether the repository holds a model of that name (a folder with a model.yaml)."""
        return (self.path_of(name) / MANIFEST).is_file()

    def manifest_data(self, name: str) -> dict[str, Any]:
        """The model's model.yaml as read, not yet validated; raises ``ManifestError``."""
        return read_manifest_data(self.path_of(name))

    def source(self, name: str) -> ModelSource:
        """Read one model's manifest and versions; raises ``ManifestError`` or ``NotFound``."""
        path = self.path_of(name)
        if not (path / MANIFEST).is_file():
            raise unknown_model(name)
        config = read_manifest(path)
        versions = tuple(sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()))
        return ModelSource(name, path, config, versions)

    def path_of(self, name: str) -> Path:
        """The model's folder; the name is checked first (no separators, no leading '.'), so the folder is a
        child of the repository's root (a symbolic link there may point elsewhere: the operator put it there)."""
        return self.root / check_model_name(name)

    def fingerprint(self, name: str) -> tuple[tuple[str, int, int], ...]:
        """A cheap summary of a model's files (path, size, mtime) that changes when any file does."""
        path = self.path_of(name)
        entries: list[tuple[str, int, int]] = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue
                entries.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns))
        return tuple(entries)

    def relative(self, text: str) -> str:
        """``text`` with this repository's location taken out, so that its paths name files relative to the
        repository (``tabular/2/model.onnx``): messages shown to clients do not reveal the server's folders."""
        for root in sorted({str(self.root.absolute()), str(self.root.resolve())}, key=len, reverse=True):
            text = text.replace(root + os.sep, "")
            text = re.sub(re.escape(root) + r"(?![^\s'\",;:)])", "<repository>", text)
        return text
