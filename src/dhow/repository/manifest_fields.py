"""Reading the fields of one mapping of model.yaml: what is used, what is unknown, and refusals that name the
file, the field and what was expected (shared by ``manifest`` and its sections' parsers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dhow.core.errors import ModelLoadError
from dhow.core.spelling import did_you_mean

__all__ = ["Fields", "ManifestError", "is_fraction", "is_int", "is_name", "is_number", "positive_int"]


class ManifestError(ModelLoadError):
    """A manifest that cannot be served; the message names file, field and expectation."""

    def __init__(self, path: Path | str, field: str, expected: str, got: object = None) -> None:
        where = f"{path}: field '{field}'" if field else str(path)
        got_text = "" if got is None else f", got {got!r}"
        super().__init__(f"{where}: expected {expected}{got_text}")


class Fields:
    """Reads the fields of one mapping, remembering which were used so that extras are refused."""

    def __init__(self, path: Path | str, prefix: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ManifestError(path, prefix, "a mapping", data)
        self.path, self.prefix, self.data = path, prefix, data
        self.seen: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, expected: str) -> ManifestError:
        return ManifestError(self.path, self.name(key), expected, self.data.get(key))

    def get(self, key: str, check: Callable[[object], bool], expected: str, default: Any = None) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        value = self.data[key]
        if not check(value):
            raise self.error(key, expected)
        return value

    def require(self, key: str, check: Callable[[object], bool], expected: str) -> Any:
        if key not in self.data:
            self.seen.add(key)
            raise ManifestError(self.path, self.name(key), f"{expected} (the field is required)")
        return self.get(key, check, expected)

    def finish(self, allowed: str) -> None:
        extra = sorted(set(map(str, self.data)) - self.seen)
        if extra:
            hint = did_you_mean(extra[0], allowed.split(", "))
            unknown = f"this one is unknown, {hint}" if hint else "this one is unknown"
            expected = f"a known field; {unknown} (known fields: {allowed})"
            raise ManifestError(self.path, self.name(extra[0]), expected)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and all(c.isalnum() or c in "._-" for c in value)


def is_fraction(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value: object) -> bool:
    return is_int(value) and value > 0  # type: ignore[operator]
