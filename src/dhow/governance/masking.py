"""PII masking: detectors for free text, per-field rules for payloads, and a filter for logs.

Everything dhow writes to logs, the audit trail or payload samples passes through a ``Masker``. A model's
``pii:`` section picks the detectors, the action on their hits and rules for whole fields:

    pii:
      detectors: [email, phone, emirates_id, iban, credit_card, ip_address]   # default: all
      action: redact            # redact | hash | partial
      fields:                   # tensor names or JSON paths (dots for nesting) -> action
        customer_email: hash
        applicant.phone: partial

``redact`` writes ``[REDACTED:<detector or field>]``; ``hash`` writes ``hash:<16 hex of HMAC-SHA256>``, the same
token for the same value and key, so joins still work; ``partial`` keeps the last 4 characters (never more than
half the value; an e-mail keeps its first character and its domain) and stars the other letters and digits.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dhow.core.errors import InvalidInput

__all__ = [
    "ACTIONS",
    "DETECTORS",
    "HASH_KEY_BYTES",
    "Action",
    "Masker",
    "MaskingLogFilter",
    "MaskingPolicy",
    "install_log_masking",
    "load_hash_key",
    "parse_masking",
]

Action = Literal["redact", "hash", "partial"]
ACTIONS: tuple[Action, ...] = ("redact", "hash", "partial")
_ACTION_BY_NAME: dict[str, Action] = {action: action for action in ACTIONS}
HASH_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class _Detector:
    name: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool]
    #: a failed candidate may be cut back at a space or dash: "4111 1111 1111 1111 2024" holds a card
    trim: bool = False

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        pos = 0
        while (match := self.pattern.search(text, pos)) is not None:
            length = self._valid_length(match.group())
            if length:
                yield match.start(), match.start() + length
                pos = match.start() + length
            else:
                pos = match.start() + 1

    def _valid_length(self, candidate: str) -> int:
        if self.valid(candidate):
            return len(candidate)
        if self.trim:
            for cut in range(len(candidate) - 1, 0, -1):
                if candidate[cut] in " -" and candidate[cut - 1] not in " -":
                    prefix = candidate[:cut]
                    if self.valid(prefix):
                        return len(prefix)
        return 0


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _card_ok(text: str) -> bool:
    digits = _digits(text)
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0 and 13 <= len(digits) <= 19


def _iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    # ISO 13616: move the first four characters to the end, letters become 10..35, the number mod 97 is 1
    return int("".join(str(int(char, 36)) for char in compact[4:] + compact[:4])) % 97 == 1


def _phone_ok(text: str) -> bool:
    digits = _digits(text)
    return 8 <= len(digits[2:] if text.startswith("00") else digits) <= 15


def _ip_ok(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return False  # 127.0.0.1, 0.0.0.0, ::1 name this machine, never a person (and the server logs its own)
    # "1::2" is a valid address but far more often a slice or a version; real IPv6 hosts carry more hex
    return "." in text or sum(char not in ":." for char in text) >= 4


_V4 = r"(?:\d{1,3}\.){3}\d{1,3}"
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)

# Most specific first, and a later detector never takes characters an earlier one took: an IBAN or an e-mail
# may hold a Luhn-valid digit run, an Emirates ID is 15 digits that may pass Luhn.
_DETECTORS: tuple[_Detector, ...] = (
    _Detector("email", _EMAIL, bool),  # the pattern is strict enough; a doubtful hit is masked
    _Detector("emirates_id", re.compile(r"(?<![\w+])784[ -]?(?:19|20)\d\d[ -]?\d{7}[ -]?\d(?!\w)"), bool),
    _Detector(
        "iban",
        re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d\d(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])"),
        _iban_ok,
        trim=True,
    ),
    # issuers' first digits are 2-6, which also keeps millisecond timestamps (1...) out
    _Detector("credit_card", re.compile(r"(?<![\w+.])[2-6]\d{3}(?:[ -]?\d){9,15}(?!\w)"), _card_ok, trim=True),
    _Detector(
        "phone",
        re.compile(
            r"(?<![\w+])(?:(?:\+|00)[1-9]\d{0,3}(?:[ -]?\(\d{1,4}\))?(?:[ -]?\d){5,13}"
            r"|0(?:5\d|[234679])(?:[ -]?\d){7})(?!\w)"
        ),
        _phone_ok,
        trim=True,
    ),
    _Detector(
        "ip_address",
        re.compile(
            rf"(?<![\w:.])(?:{_V4}(?!\w|\.\d)"
            rf"|(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_V4}|[0-9A-Fa-f]{{1,4}})?(?<![^:]:)(?!\w|:[0-9A-Fa-f:]|\.\d))"
        ),
        _ip_ok,
    ),
)
#: the detector names, in the order they are applied
DETECTORS: tuple[str, ...] = tuple(detector.name for detector in _DETECTORS)

# every detector needs a digit, an '@' or an IPv6 ':'; most log lines and strings have none worth scanning
_WORTH_SCANNING = re.compile(r"[\d@:]")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


@dataclass(frozen=True, slots=True)
class MaskingPolicy:
    """What a ``Masker`` looks for in free text, what it does with a hit, and rules for whole fields."""

    detectors: frozenset[str] = frozenset(DETECTORS)
    action: Action = "redact"
    #: a tensor name or a dotted JSON path -> the action applied to the whole value
    fields: Mapping[str, Action] = field(default_factory=dict)


def parse_masking(spec: Mapping[str, Any] | None, where: str) -> MaskingPolicy:
    """Validate a manifest's ``pii:`` section; ``None`` gives all detectors, redact, no field rules."""
    if spec is None:
        return MaskingPolicy()
    if not isinstance(spec, Mapping):
        raise InvalidInput(f"{where}: expected a mapping with 'detectors', 'action' and 'fields', got {spec!r}")
    unknown = sorted(set(map(str, spec)) - {"detectors", "action", "fields"})
    if unknown:
        raise InvalidInput(f"{where}: unknown field {unknown[0]!r} (known: detectors, action, fields)")
    action = spec.get("action")
    return MaskingPolicy(
        detectors=_parse_detectors(spec.get("detectors"), where),
        action="redact" if action is None else _parse_action(action, f"{where}: 'action'"),
        fields=_parse_fields(spec.get("fields"), where),
    )


def _parse_detectors(value: object, where: str) -> frozenset[str]:
    if value is None:
        return frozenset(DETECTORS)
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise InvalidInput(f"{where}: 'detectors' must be a list of names from {', '.join(DETECTORS)}, got {value!r}")
    for name in value:
        if name not in DETECTORS:
            raise InvalidInput(f"{where}: unknown detector {name!r} in 'detectors' (known: {', '.join(DETECTORS)})")
    return frozenset(value)


def _parse_action(value: object, what: str) -> Action:
    action = _ACTION_BY_NAME.get(value) if isinstance(value, str) else None
    if action is None:
        raise InvalidInput(f"{what} must be one of {', '.join(ACTIONS)}, got {value!r}")
    return action


def _parse_fields(value: object, where: str) -> dict[str, Action]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{where}: 'fields' must map a tensor name or JSON path (a.b) to an action, got {value!r}")
    fields: dict[str, Action] = {}
    for path, action in value.items():
        if not isinstance(path, str) or not all(path.split(".")):
            raise InvalidInput(f"{where}: 'fields' keys are names or dotted paths like applicant.phone, got {path!r}")
        fields[path] = _parse_action(action, f"{where}: fields.{path}")
    return fields


def _star(text: str) -> str:
    return _LETTER_OR_DIGIT.sub("*", text)


def _partial(value: str) -> str:
    if _EMAIL.fullmatch(value):
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}{_star(local[1:])}@{domain}"
    # never show more than half: "keep the last 4" of a 4-digit PIN would keep all of it
    cut = len(value) - min(4, len(value) // 2)
    return _star(value[:cut]) + value[cut:]


def _walled(text: str, spans: list[tuple[int, int, str]]) -> str:
    """``text`` with each span replaced by NULs, which no detector matches and each treats as a boundary."""
    parts: list[str] = []
    pos = 0
    for start, end, _ in spans:
        parts += (text[pos:start], "\0" * (end - start))
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _canonical(value: str, detector: str | None) -> str:
    """One spelling per value, so that hashed tokens join however it was written: case, spaces, dashes."""
    if _EMAIL.fullmatch(value):
        return value.lower()  # domains are case-blind, and mail systems treat local parts so in practice
    if detector == "phone":
        digits = _digits(value)
        return f"+{digits[2:]}" if value.startswith("00") else f"+{digits}" if value.startswith("+") else digits
    if detector in ("emirates_id", "credit_card"):
        return _digits(value)
    if detector == "iban":
        return value.replace(" ", "").upper()
    if detector == "ip_address":
        return ipaddress.ip_address(value).compressed
    return value


def _plain(value: Any) -> Any:
    """Numpy arrays and scalars as Python data, bytes as text: what JSON (and the detectors) can take."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return value


class Masker:
    """Applies one ``MaskingPolicy``; ``hash_key`` is the HMAC secret of the ``hash`` action."""

    def __init__(self, policy: MaskingPolicy, hash_key: bytes) -> None:
        if not hash_key and "hash" in (policy.action, *policy.fields.values()):
            raise ValueError("the hash action needs a non-empty hash_key (see load_hash_key)")
        self.policy = policy
        self._key = hash_key
        self._detectors = tuple(d for d in _DETECTORS if d.name in policy.detectors)
        self._fields = dict(policy.fields)

    def spec(self) -> dict[str, Any]:
        """The policy and key as JSON, for a process of dhow's own that masks on this one's behalf (the payload
        log's writer): ``from_spec`` builds the same masker there."""
        policy = self.policy
        return {"detectors": sorted(policy.detectors), "action": policy.action, "fields": dict(policy.fields),
                "key": self._key.hex()}  # fmt: skip

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Masker:
        policy = MaskingPolicy(frozenset(spec["detectors"]), spec["action"], dict(spec["fields"]))
        return cls(policy, bytes.fromhex(spec["key"]))

    def mask_text(self, text: str) -> str:
        """``text`` with every detector hit replaced by the policy's action."""
        if len(text) < 6 or not self._detectors or not _WORTH_SCANNING.search(text):
            return text
        hits: list[tuple[int, int, str]] = []
        scanned = text
        for detector in self._detectors:
            found = [(start, end, detector.name) for start, end in detector.spans(scanned)]
            if found:
                hits += found
                # later detectors see a claimed value as a wall they may end at, never as digits to extend into:
                # "+971 50 123 4567 784-1987-1234567-1" is a phone number next to an Emirates ID
                scanned = _walled(scanned, found)
        parts: list[str] = []
        pos = 0
        for start, end, name in sorted(hits):
            parts += (text[pos:start], self._apply(self.policy.action, text[start:end], name, detected=True))
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def mask_value(self, value: Any, path: str = "") -> Any:
        """A masked copy of JSON-like data; a field rule on ``path`` masks the whole value."""
        value = _plain(value)
        action = self._fields.get(path) if path else None
        if action is not None:
            return self._mask_all(value, action, path)
        if isinstance(value, str):
            return self.mask_text(value)
        if isinstance(value, Mapping):
            return self._mask_mapping(value, path)
        if isinstance(value, list | tuple):
            return [self.mask_value(item, path) for item in value]
        return value

    def mask_tensors(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """JSON-ready, masked copies of named tensors (numpy arrays or lists), for payload samples."""
        masked: dict[str, Any] = {}
        for name, data in tensors.items():
            if name not in self._fields and isinstance(data, np.ndarray) and data.dtype.kind in "biuf":
                masked[name] = data.tolist()  # numbers carry no text for the detectors
            else:
                masked[name] = self.mask_value(data, name)
        return masked

    def _mask_mapping(self, value: Mapping[Any, Any], path: str) -> dict[str, Any]:
        # a key is text the client chose too (an unknown member named like an e-mail address): masked as text
        masked = {
            self.mask_text(str(k)): self.mask_value(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
        # a v2 tensor in a JSON body ({"name": ..., "data": [...]}): a rule on the tensor's name masks its data
        name = value.get("name")
        action = self._fields.get(name) if isinstance(name, str) and "data" in value else None
        if action is not None and isinstance(name, str):
            masked["data"] = self._mask_all(value["data"], action, name)
        return masked

    def _mask_all(self, value: Any, action: Action, label: str) -> Any:
        value = _plain(value)
        if value is None:
            return None
        if isinstance(value, Mapping):
            return {str(k): self._mask_all(v, action, label) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._mask_all(item, action, label) for item in value]
        return self._apply(action, str(value), label)

    def _apply(self, action: Action, value: str, label: str, *, detected: bool = False) -> str:
        """``label``: the detector that found ``value`` (``detected``) or the field rule that names it."""
        if action == "redact":
            return f"[REDACTED:{label}]"
        if action == "hash":
            canonical = _canonical(value, label if detected else None)
            return "hash:" + hmac.new(self._key, canonical.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
        return _partial(value)


# attributes every LogRecord has; anything else came in through ``extra=`` and is masked too
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_MASKED = "dhow_masked"
_EXCEPTION_FORMATTER = logging.Formatter()


class MaskingLogFilter(logging.Filter):
    """Masks each record in place (message, arguments, exception, stack, extras) before any handler writes it."""

    def __init__(self, masker: Masker) -> None:
        super().__init__()
        self.masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _MASKED, False):  # a record reaches every handler, each with this filter
            return True
        mask = self.masker.mask_text
        record.msg = mask(_message(record))
        record.args = ()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
            # Formatter prints exc_text alone; a formatter rendering exc_info itself would print it unmasked
            record.exc_info = None
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS:
                setattr(record, key, self.masker.mask_value(value))
        setattr(record, _MASKED, True)
        return True


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # a call whose arguments do not fit its format must not raise from the filter, nor leak its arguments
        return f"{record.msg} (arguments that do not fit the format: {record.args!r})"


def install_log_masking(masker: Masker) -> MaskingLogFilter:
    """Mask every record the root logger's handlers write (handlers added later are not covered)."""
    log_filter = MaskingLogFilter(masker)
    # on handlers, not loggers: a logger's filters are not consulted for records propagated from its children
    for handler in logging.getLogger().handlers:
        handler.addFilter(log_filter)
    return log_filter


def load_hash_key(path: Path) -> bytes:
    """The 32-byte masking key in ``path``, created (mode 0600) when absent so tokens survive restarts."""
    try:
        if not path.exists():
            _create_key(path)
        key = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read or create the masking key {path}: {exc.strerror or exc}") from None
    if len(key) != HASH_KEY_BYTES:
        raise InvalidInput(
            f"the masking key {path} holds {len(key)} bytes, expected {HASH_KEY_BYTES}; restore it, or delete it "
            "to create a new one (hashed tokens will then differ from earlier ones)"
        )
    return key


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".masking-key-")  # mkstemp creates it with mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(HASH_KEY_BYTES))
            out.flush()
            os.fsync(out.fileno())
        # a hard link never replaces: when two processes start at once, both keep the first key written
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
