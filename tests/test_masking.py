"""PII masking: detectors and their near-misses, actions, field rules, manifest validation, the log filter, the key,
properties over generated PII, and what a model prints in a real server."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import re
import stat
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhow.core.errors import InvalidInput
from dhow.governance.masking import (
    DETECTORS,
    Masker,
    MaskingLogFilter,
    MaskingPolicy,
    install_log_masking,
    load_hash_key,
    parse_masking,
)
from tests.conftest import start_dhow

KEY = b"k" * 32


def masker(spec: dict[str, object] | None = None, key: bytes = KEY) -> Masker:
    return Masker(parse_masking(spec, "test.yaml: pii"), key)


def luhn_digit(body: str) -> str:
    """The check digit that makes ``body + digit`` pass Luhn (written independently of the module)."""
    for digit in "0123456789":
        digits = [int(c) for c in body + digit][::-1]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits))
        if total % 10 == 0:
            return digit
    raise AssertionError("unreachable")


VALID = [
    ("email", "john.doe+vip@example.co.uk"),
    ("email", "sara_99@mail.example.ae"),
    ("phone", "+971501234567"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "+1 (555) 123-4567"),
    ("phone", "00971 50 123 4567"),
    ("phone", "050-123-4567"),
    ("phone", "04 123 4567"),
    ("emirates_id", "784-1990-1234567-1"),
    ("emirates_id", "784199012345671"),
    ("emirates_id", "784 1985 7654321 0"),
    ("iban", "AE070331234567890123456"),
    ("iban", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "DE89 3704 0044 0532 0130 00"),
    ("credit_card", "4111 1111 1111 1111"),
    ("credit_card", "5500-0000-0000-0004"),
    ("credit_card", "378282246310005"),
    ("credit_card", "6011111111111117"),
    ("ip_address", "192.168.1.10"),
    ("ip_address", "255.255.255.255"),
    ("ip_address", "2001:db8::8a2e:370:7334"),
    ("ip_address", "fe80::1ff:fe23:4567:890a"),
    ("ip_address", "2001:0db8:0000:0000:0000:ff00:0042:8329"),
    ("ip_address", "::ffff:192.0.2.1"),
]


@pytest.mark.parametrize(("detector", "secret"), VALID)
def test_detector_finds_valid_values_in_text(detector: str, secret: str) -> None:
    text = f"customer said: {secret}, please check."
    assert masker().mask_text(text) == f"customer said: [REDACTED:{detector}], please check."


@pytest.mark.parametrize(("detector", "secret"), VALID)
def test_detector_alone_finds_its_values(detector: str, secret: str) -> None:
    assert masker({"detectors": [detector]}).mask_text(f"({secret})") == f"([REDACTED:{detector}])"


NEAR_MISSES = [
    "card 4111 1111 1111 1112 failed",  # wrong Luhn
    "iban GB83 WEST 1234 5698 7654 32",  # wrong mod-97 check digits
    "iban AE07 0331 2345 6789 0123 457",  # one digit changed
    "host 999.1.1.1 and 10.0.0.256",  # octets over 255
    "call +971 5012 or 0501234",  # too few digits
    "the price is 1299.99 AED, was 1,450.00",
    "model v1.2.3 replaced 2.13.0 and version 10.4",
    "order 12345678 shipped in 2024",
    "at 12:30:45 on 2024-06-01T10:00:00Z",
    "slice x[1::2] and std::vector",
    "mac 00:1a:2b:3c:4d:5e",
    "timestamp 1718000000000 ms",
    "an ordinary sentence with words only",
    "784-1890-1234567-1 is no Emirates ID year",
    "user@localhost is not an address",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(text: str) -> None:
    assert masker().mask_text(text) == text


def test_several_hits_and_trailing_numbers() -> None:
    text = "mail a.b@example.com from 10.0.0.1:8080, card 4111-1111-1111-1111 2024, iban GB82 WEST 1234 5698 7654 32 OK"
    assert masker().mask_text(text) == (
        "mail [REDACTED:email] from [REDACTED:ip_address]:8080, card [REDACTED:credit_card] 2024, "
        "iban [REDACTED:iban] OK"
    )
    # too many digits for one value: the candidate is cut back at a separator until it validates
    text = "card 4111 1111 1111 1111 12 times, call +971 50 123 4567 1234 times"
    assert masker().mask_text(text) == "card [REDACTED:credit_card] 12 times, call [REDACTED:phone] 1234 times"


def iban_with_check_digits(country: str, bban: str) -> str:
    """An IBAN with correct ISO 13616 check digits (written independently of the module)."""
    numeric = "".join(str(int(c, 36)) for c in bban.replace(" ", "") + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d} {bban}"


def test_emirates_id_that_passes_luhn_is_masked_as_emirates_id() -> None:
    body = "78419901234567"
    emirates_id = body + luhn_digit(body)
    # payment cards start with 2-6, so the card detector alone leaves it; ordering keeps it an Emirates ID anyway
    assert masker({"detectors": ["credit_card"]}).mask_text(emirates_id) == emirates_id
    assert masker().mask_text(f"id {emirates_id}") == "id [REDACTED:emirates_id]"


def test_iban_holding_a_card_number_is_masked_once_as_iban() -> None:
    iban = iban_with_check_digits("AE", "0334 4111 1111 1111 1111")
    assert masker({"detectors": ["credit_card"]}).mask_text(iban) == f"{iban[:10]}[REDACTED:credit_card]"
    assert masker({"detectors": ["iban", "credit_card"]}).mask_text(f"pay {iban}.") == "pay [REDACTED:iban]."


def test_same_characters_are_never_masked_twice() -> None:
    assert masker().mask_text("0501234567@example.com") == "[REDACTED:email]"
    hashed = masker({"action": "hash"}).mask_text("id 784-1990-1234567-1 end")
    assert re.fullmatch(r"id hash:[0-9a-f]{16} end", hashed)


def test_hash_is_keyed_and_stable() -> None:
    text = "write to john@example.com"
    first = masker({"action": "hash"}).mask_text(text)
    expected = hmac.new(KEY, b"john@example.com", hashlib.sha256).hexdigest()[:16]
    assert first == f"write to hash:{expected}"
    assert masker({"action": "hash"}).mask_text(text) == first
    assert masker({"action": "hash"}, key=b"x" * 32).mask_text(text) != first
    assert masker({"action": "hash"}).mask_text("write to jane@example.com") != first


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("+971501234567", "+********4567"),
        ("4111 1111 1111 1111", "**** **** **** 1111"),
        ("050-123-4567", "***-***-4567"),
        ("john@example.com", "j***@example.com"),
        ("john.doe@example.com", "j***.***@example.com"),
    ],
)
def test_partial_keeps_the_tail_and_separators(text: str, masked: str) -> None:
    assert masker({"action": "partial"}).mask_text(f"x {text} y") == f"x {masked} y"


def test_partial_never_shows_more_than_half_of_a_field() -> None:
    m = masker({"fields": {"pin": "partial", "age": "partial"}})
    assert m.mask_value({"pin": "1234", "age": 42}) == {"pin": "**34", "age": "*2"}


def test_empty_key_is_refused_only_when_hashing() -> None:
    assert Masker(MaskingPolicy(), b"").mask_text("a@example.com") == "[REDACTED:email]"
    with pytest.raises(ValueError, match="hash_key"):
        masker({"fields": {"x": "hash"}}, key=b"")


def test_field_rules_on_nested_json() -> None:
    rules = {"customer_email": "hash", "notes": "redact", "applicant.phone": "partial", "amount": "hash"}
    m = masker({"fields": rules})
    data = {
        "customer_email": "john@example.com",
        "notes": ["call me", "any time"],
        "applicant": {"phone": "+971501234567", "name": "Sara", "mail": "sara@example.ae", "age": 31},
        "phone": "no rule here",
        "amount": 1200,
        "score": 0.75,
        "raw": b"from 192.168.0.1 \xff",
    }
    before = copy.deepcopy(data)
    masked = m.mask_value(data)
    assert data == before  # the input is not touched
    token = hmac.new(KEY, b"john@example.com", hashlib.sha256).hexdigest()[:16]
    assert masked == {
        "customer_email": f"hash:{token}",
        "notes": ["[REDACTED:notes]", "[REDACTED:notes]"],
        "applicant": {"phone": "+********4567", "name": "Sara", "mail": "[REDACTED:email]", "age": 31},
        "phone": "no rule here",
        "amount": "hash:" + hmac.new(KEY, b"1200", hashlib.sha256).hexdigest()[:16],
        "score": 0.75,
        "raw": "from [REDACTED:ip_address] \ufffd",
    }


def test_field_rule_on_a_tensor_in_a_v2_json_body() -> None:
    m = masker({"fields": {"customer_email": "redact"}})
    body = {"inputs": [{"name": "customer_email", "datatype": "BYTES", "shape": [2], "data": ["a@b.ae", "x"]}]}
    masked = m.mask_value(body)
    assert masked["inputs"][0]["data"] == ["[REDACTED:customer_email]", "[REDACTED:customer_email]"]
    assert masked["inputs"][0]["name"] == "customer_email"
    assert body["inputs"][0]["data"] == ["a@b.ae", "x"]


def test_mask_tensors() -> None:
    m = masker({"fields": {"customer_id": "redact", "phone": "partial"}})
    tensors: dict[str, Any] = {
        "text": np.array([b"mail john@example.com", b"nothing"], dtype=object),
        "fixed": np.array([b"ip 10.1.2.3", b"ok"], dtype="S16"),
        "phone": np.array([["+971501234567"], ["050-123-4567"]]),
        "customer_id": np.array([[17, 18]], dtype=np.int64),
        "features": np.array([[0.5, 4111111111111111.0]], dtype=np.float32),
        "flags": np.array([True, False]),
        "listed": ["call +44 20 7946 0958", 3],
    }
    masked = m.mask_tensors(tensors)
    assert masked == {
        "text": ["mail [REDACTED:email]", "nothing"],
        "fixed": ["ip [REDACTED:ip_address]", "ok"],
        "phone": [["+********4567"], ["***-***-4567"]],
        "customer_id": [["[REDACTED:customer_id]", "[REDACTED:customer_id]"]],
        "features": tensors["features"].tolist(),
        "flags": [True, False],
        "listed": ["call [REDACTED:phone]", 3],
    }
    assert tensors["text"][0] == b"mail john@example.com"


def test_default_policy() -> None:
    assert parse_masking(None, "x") == MaskingPolicy()
    assert parse_masking({}, "x") == MaskingPolicy(frozenset(DETECTORS), "redact", {})


def test_full_spec_is_parsed() -> None:
    policy = parse_masking(
        {"detectors": ["email", "iban"], "action": "partial", "fields": {"a.b": "hash", "c": "redact"}}, "x"
    )
    assert policy == MaskingPolicy(frozenset({"email", "iban"}), "partial", {"a.b": "hash", "c": "redact"})
    assert masker({"detectors": []}).mask_text("a@example.com") == "a@example.com"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["email"], "expected a mapping with 'detectors', 'action' and 'fields'"),
        ({"detector": ["email"]}, "unknown field 'detector' (known: detectors, action, fields)"),
        ({"detectors": "email"}, "'detectors' must be a list of names from email, emirates_id"),
        ({"detectors": ["email", "ssn"]}, "unknown detector 'ssn' in 'detectors' (known: email"),
        ({"action": "mask"}, "'action' must be one of redact, hash, partial, got 'mask'"),
        ({"fields": ["a"]}, "'fields' must map a tensor name or JSON path (a.b) to an action"),
        ({"fields": {"a..b": "hash"}}, "'fields' keys are names or dotted paths like applicant.phone, got 'a..b'"),
        ({"fields": {1: "hash"}}, "got 1"),
        ({"fields": {"notes": None}}, "fields.notes must be one of redact, hash, partial, got None"),
    ],
)
def test_invalid_specs_name_the_field(spec: object, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_masking(spec, "models/fraud/model.yaml: pii")  # type: ignore[arg-type]
    assert caught.value.message.startswith("models/fraud/model.yaml: pii: ")
    assert message in caught.value.message


SECRETS = ["john@example.com", "+971501234567", "784-1990-1234567-1", "4111 1111 1111 1111", "192.168.7.7", "sara@x.ae"]


class ExcInfoFormatter(logging.Formatter):
    """Renders ``exc_info`` itself, as JSON formatters do, instead of using the cached ``exc_text``."""

    def format(self, record: logging.LogRecord) -> str:
        rendered = self.formatException(record.exc_info) if record.exc_info else "-"
        return f"{record.getMessage()} exception={rendered}"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """A real file handler on the root logger, masked by install_log_masking; removed afterwards."""
    path = tmp_path / "dhow.log"
    plain = logging.FileHandler(path, encoding="utf-8")
    plain.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s %(client)s"))
    rendering = logging.FileHandler(path, encoding="utf-8")
    rendering.setFormatter(ExcInfoFormatter())
    root = logging.getLogger()
    root.addHandler(plain)
    root.addHandler(rendering)
    log_filter = install_log_masking(masker())
    try:
        yield path
    finally:
        for handler in root.handlers:
            handler.removeFilter(log_filter)
        for handler in (plain, rendering):
            root.removeHandler(handler)
            handler.close()


def test_log_filter_masks_message_args_exception_and_extras(log_file: Path) -> None:
    log = logging.getLogger("dhow.test_masking.child")  # a child logger: its records propagate to the root handler
    log.setLevel(logging.INFO)
    log.warning("login by john@example.com from 192.168.7.7", extra={"client": "n/a"})
    log.warning("caller %s sent card %s", "+971501234567", "4111 1111 1111 1111", extra={"client": "sara@x.ae"})
    log.warning("wrong format %d", "784-1990-1234567-1", extra={"client": "n/a"})
    try:
        raise ValueError("bad id 784-1990-1234567-1 for john@example.com")
    except ValueError:
        log.exception("request failed for %s", "sara@x.ae", extra={"client": "n/a"})
    written = log_file.read_text(encoding="utf-8")
    for secret in SECRETS:
        assert secret not in written
    assert written.count("[REDACTED:email]") >= 4
    assert "[REDACTED:credit_card]" in written and "[REDACTED:phone]" in written
    assert "ValueError: bad id [REDACTED:emirates_id] for [REDACTED:email]" in written
    assert "Traceback (most recent call last)" in written  # the exception is still there, masked


def test_log_filter_keeps_the_record_usable_by_any_formatter() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "user %s at %s", ("a@example.com", "10.0.0.9"), None)
    assert MaskingLogFilter(masker()).filter(record)
    assert record.args == ()
    assert record.msg == "user [REDACTED:email] at [REDACTED:ip_address]"
    assert logging.Formatter("%(levelname)s %(message)s").format(record) == f"INFO {record.msg}"
    assert MaskingLogFilter(masker()).filter(record) and record.getMessage() == record.msg


def test_hash_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "masking.key"
    key = load_hash_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_hash_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["masking.key"]  # no temporary file left behind
    assert load_hash_key(tmp_path / "other.key") != key


def test_hash_key_created_by_racing_starts_is_one_key(tmp_path: Path) -> None:
    path = tmp_path / "masking.key"
    barrier = threading.Barrier(8)

    def start() -> bytes:
        barrier.wait()
        return load_hash_key(path)

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: start(), range(8)))
    assert keys == {path.read_bytes()}


def test_hash_key_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "masking.key"
    path.write_bytes(b"short")
    with pytest.raises(InvalidInput, match=r"holds 5 bytes, expected 32; restore it, or delete it"):
        load_hash_key(path)


# -- values next to each other, and one token per value -------------------------------------------------


def test_a_phone_number_directly_followed_by_an_emirates_id_is_masked_too() -> None:
    text = "call +971 50 123 4567 784-1987-1234567-1 today"
    assert masker().mask_text(text) == "call [REDACTED:phone] [REDACTED:emirates_id] today"
    assert masker().mask_text("+971501234567 784198712345671") == "[REDACTED:phone] [REDACTED:emirates_id]"


@pytest.mark.parametrize(
    ("kind", "spellings"),
    [
        ("email", ["bob@example.com", "BOB@example.com", "Bob@Example.COM"]),
        ("phone", ["+971 50 123 4567", "+971501234567", "00971 50 123 4567", "+971-50-123-4567"]),
        ("emirates_id", ["784-1990-1234567-1", "784199012345671", "784 1990 1234567 1"]),
        ("credit_card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111"]),
        ("iban", ["GB82 WEST 1234 5698 7654 32", "GB82WEST12345698765432"]),
        ("ip_address", ["2001:db8::8a2e:370:7334", "2001:DB8:0:0:0:8A2E:370:7334"]),
    ],
)
def test_hash_tokens_are_the_same_however_a_value_is_written(kind: str, spellings: list[str]) -> None:
    tokens = {masker({"action": "hash"}).mask_text(f"value {spelling} end") for spelling in spellings}
    assert len(tokens) == 1, tokens
    assert re.fullmatch(r"value hash:[0-9a-f]{16} end", tokens.pop())


def test_a_field_rule_hashes_an_email_the_same_in_any_case() -> None:
    m = masker({"fields": {"customer_email": "hash"}})
    lower, upper = (m.mask_value({"customer_email": v}) for v in ("bob@example.com", "BOB@EXAMPLE.COM"))
    assert lower == upper


# -- properties over generated PII in generated text ----------------------------------------------------

DIGIT = st.sampled_from("0123456789")


def digits(n: int) -> st.SearchStrategy[str]:
    return st.text(DIGIT, min_size=n, max_size=n)


@st.composite
def emails(draw: st.DrawFn) -> str:
    local = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,15}[A-Za-z0-9]", fullmatch=True))
    labels = draw(st.lists(st.from_regex(r"[A-Za-z0-9]{1,10}", fullmatch=True), min_size=1, max_size=3))
    return f"{local}@{'.'.join(labels)}.{draw(st.sampled_from(['ae', 'com', 'CO.UK', 'org']))}"


@st.composite
def phones(draw: st.DrawFn) -> str:
    mobile = f"5{draw(digits(1))}"
    line = draw(digits(7))
    return draw(
        st.sampled_from(
            [
                f"+971 {mobile} {line[:3]} {line[3:]}",
                f"+971{mobile}{line}",
                f"00971 {mobile} {line[:3]} {line[3:]}",
                f"0{mobile}-{line[:3]}-{line[3:]}",
                f"+44 20 {line[:4]} {line[4:]}{draw(digits(1))}",
            ]
        )
    )


@st.composite
def emirates_ids(draw: st.DrawFn) -> str:
    sep = draw(st.sampled_from(["-", " ", ""]))
    year = draw(st.integers(1900, 2099))
    return f"784{sep}{year}{sep}{draw(digits(7))}{sep}{draw(digits(1))}"


@st.composite
def cards(draw: st.DrawFn) -> str:
    body = draw(st.sampled_from("23456")) + draw(digits(14))
    number = body + luhn_digit(body)
    sep = draw(st.sampled_from(["-", " ", ""]))
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


@st.composite
def ibans(draw: st.DrawFn) -> str:
    bban = draw(st.sampled_from(["0331", "WEST"])) + draw(digits(15))
    iban = iban_with_check_digits("AE" if bban[0] == "0" else "GB", bban).replace(" ", "")
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4)) if draw(st.booleans()) else iban


@st.composite
def ip_addresses(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        first = draw(st.integers(1, 223).filter(lambda n: n != 127))
        return ".".join(map(str, [first, *draw(st.lists(st.integers(0, 255), min_size=3, max_size=3))]))
    groups = draw(st.lists(st.integers(1, 0xFFFF), min_size=8, max_size=8))
    return ":".join(f"{group:x}" for group in groups)


PII_VALUES: dict[str, st.SearchStrategy[str]] = {
    "email": emails(),
    "phone": phones(),
    "emirates_id": emirates_ids(),
    "credit_card": cards(),
    "iban": ibans(),
    "ip_address": ip_addresses(),
}
KINDS = st.sampled_from(sorted(PII_VALUES))
#: prose around the values: letters of several scripts and punctuation, never a digit, '@' or ':'
WORDS = st.text(st.sampled_from("abcdefXYZ éşعربي!?'\"()/"), max_size=20)
#: what may stand between a value and its neighbour
SEPARATORS = st.sampled_from([" ", ", ", "; ", "\n", "\t", " (", ") ", " / "])


@st.composite
def pii_texts(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """Prose with PII values in it, the text with each replaced by its redaction, and the values."""
    text, expected, values = [draw(WORDS)], [], []
    expected.append(text[0])
    for kind in draw(st.lists(KINDS, min_size=1, max_size=5)):
        value, before, after, words = draw(PII_VALUES[kind]), draw(SEPARATORS), draw(SEPARATORS), draw(WORDS)
        text += [before, value, after, words]
        expected += [before, f"[REDACTED:{kind}]", after, words]
        values.append(value)
    return "".join(text), "".join(expected), values


@settings(max_examples=400, deadline=None)
@given(pii_texts())
def test_every_generated_value_in_prose_is_masked_and_nothing_else(case: tuple[str, str, list[str]]) -> None:
    text, expected, _ = case
    assert masker().mask_text(text) == expected


@settings(max_examples=300, deadline=None)
@given(KINDS.flatmap(lambda kind: PII_VALUES[kind]), st.sampled_from(["emirates_id", "email"]), st.data())
def test_a_value_directly_followed_by_another_is_masked_whole(first: str, kind: str, data: st.DataObject) -> None:
    second = data.draw(PII_VALUES[kind])
    masked = masker().mask_text(f"{first} {second}")
    assert not re.search(r"[0-9@]", masked), masked  # not one digit of either value is left
    assert masked.endswith(f" [REDACTED:{kind}]")


@settings(max_examples=200, deadline=None)
@given(pii_texts())
def test_hash_tokens_ignore_the_case_of_emails(case: tuple[str, str, list[str]]) -> None:
    text, _, values = case
    hashing = masker({"action": "hash"})
    recased = text
    for value in values:
        if "@" in value:
            recased = recased.replace(value, value.swapcase())
    assert hashing.mask_text(recased) == hashing.mask_text(text)
    for value in values:
        assert value not in hashing.mask_text(text)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_characters="0123456789@:", blacklist_categories=("Nd",))))
def test_text_without_digits_at_signs_or_colons_is_left_alone(text: str) -> None:
    assert masker().mask_text(text) == text


# -- what a model prints in the server's own process ----------------------------------------------------

PRINTING_MODEL = """
import sys

import numpy as np


class Printer:
    def load(self):
        pass

    def predict(self, inputs):
        for text in inputs["text"].reshape(-1):
            note = text.decode() if isinstance(text, bytes) else str(text)
            print("printed note:", note, flush=True)  # several writes: the value and its line end come apart
            print("stderr note:", note, file=sys.stderr)
        return {"echo": inputs["text"]}
"""


def test_what_a_thread_instance_prints_is_masked(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "printer"
    (folder / "1").mkdir(parents=True)
    (folder / "model.yaml").write_text(
        "runtime: python\nmax_batch_size: 2\ninstances: {kind: thread}\n"
        "inputs: [{name: text, datatype: BYTES, shape: [-1, 1]}]\n"
        "outputs: [{name: echo, datatype: BYTES, shape: [-1, 1]}]\n",
        encoding="utf-8",
    )
    (folder / "1" / "model.py").write_text(PRINTING_MODEL, encoding="utf-8")
    server = start_dhow(tmp_path / "models", tmp_path)
    try:
        note = "call +971 50 123 4567 784-1987-1234567-1 or mail Layla@Example.ae"
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [note]}]}
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/models/printer/infer", json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer)["outputs"][0]["data"] == [note]
        log = server.log()
    finally:
        assert server.stop() == 0, server.log()
    masked = "call [REDACTED:phone] [REDACTED:emirates_id] or mail [REDACTED:email]"
    assert f"printed note: {masked}" in log and f"stderr note: {masked}" in log, log
    for secret in ("123 4567", "1234567-1", "Layla"):
        assert secret not in log
