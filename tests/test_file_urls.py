"""``file:`` URLs as the options that take a local path read them: the path percent-decoded (RFC 8089), a ``#``
or (but for --payload-log, whose query holds its options) a ``?`` refused with the URL meant, plain paths as
written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///tmp/my%20models", "/tmp/my models"),
        ("file://localhost/data/run%233/out", "/data/run#3/out"),
        ("file:///tmp/a%3Fb", "/tmp/a?b"),
        ("file:///tmp/caf%C3%A9/x", "/tmp/café/x"),
        ("file:///tmp/caf\u00e9 raw/x", "/tmp/caf\u00e9 raw/x"),  # as a shell hands it over, unescaped
        ("file:///tmp/100%25", "/tmp/100%"),
        ("file:/tmp/one%20slash", "/tmp/one slash"),
    ],
)
def test_a_file_urls_path_is_percent_decoded(url: str, path: str) -> None:
    assert local_path(url, "--repository") == path


@pytest.mark.parametrize("path", ["/tmp/run#3/out", "/tmp/my%20models", "relative/a?b", "s3://bucket/a%20b#c"])
def test_a_plain_path_or_another_url_is_taken_as_written(path: str) -> None:
    assert local_path(path, "--input") == path


@pytest.mark.parametrize(
    ("url", "meant"),
    [
        ("file:///data/run#3/out", "file:///data/run%233/out"),
        ("file:///data/run#3/out#4", "file:///data/run%233/out%234"),
        ("file:///data/out#", "file:///data/out%23"),
    ],
)
@pytest.mark.parametrize("option", ["--repository", "--input", "--output", "--payload-log"])
def test_a_fragment_is_refused_showing_the_url_meant(url: str, meant: str, option: str) -> None:
    """``#`` ends a URL's path: ``file:///data/run#3/out`` names /data/run, never what its writer meant."""
    with pytest.raises(InvalidInput) as refused:
        local_path(url, option, query=option == "--payload-log")
    message = refused.value.message
    assert message.startswith(f"{option} {url!r}: ") and "write # as %23" in message and message.endswith(meant)


@pytest.mark.parametrize(
    ("url", "meant"),
    [
        ("file:///tmp/a?b", "file:///tmp/a%3Fb"),
        ("file:///tmp/a?", "file:///tmp/a%3F"),
        ("file:///tmp/a?b#c", "file:///tmp/a%3Fb%23c"),
    ],
)
@pytest.mark.parametrize("option", ["--repository", "--input", "--output"])
def test_a_query_is_refused_by_an_option_that_takes_none(url: str, meant: str, option: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        local_path(url, option)
    message = refused.value.message
    assert message.startswith(f"{option} {url!r}: ") and "write ? as %3F" in message and message.endswith(meant)


def test_the_payload_log_keeps_its_options_in_the_query() -> None:
    assert local_path("file:///var/log/my%20logs/e.jsonl?max_bytes=5", "--payload-log", query=True) == (
        "/var/log/my logs/e.jsonl"
    )


def test_a_nul_byte_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"--input 'file:///tmp/a%00b': .*NUL"):
        local_path("file:///tmp/a%00b", "--input")


@pytest.mark.parametrize(
    ("option", "meant"),
    [("--input", "file:///data/run%233%3Fx"), ("--repository", "file:///data/run%233%3Fx"),
     ("--payload-log", "file:///data/run%233?x")],
)  # fmt: skip
def test_the_url_shown_for_a_fragment_is_not_refused_again_for_its_query(option: str, meant: str) -> None:
    """``file:///data/run#3?x``: its ``?`` is in the fragment; the URL shown encodes it too where no query is
    taken (``run%233?x`` would be refused in turn), and keeps it as the query of ``--payload-log``."""
    query = option == "--payload-log"
    with pytest.raises(InvalidInput) as refused:
        local_path("file:///data/run#3?x", option, query=query)
    assert refused.value.message.endswith(meant)
    assert local_path(meant, option, query=query) == ("/data/run#3?x" if not query else "/data/run#3")


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("file:data/x", "'data/x' is no absolute path"),
        ("file:", "names no path"),
        ("file://", "names no path"),
        ("file://localhost", "names no path"),
        ("file://localhost?x=1", "names no path"),
        ("file:///tmp/a%2Fb", "%2F"),
        ("file:///tmp/a%2fb/c", "%2F"),
    ],
)
def test_a_relative_or_empty_path_or_an_escaped_slash_is_refused(url: str, said: str) -> None:
    """A file URL names an absolute path (``file:data/x`` would be read from wherever the server runs, ``file://``
    alone as ''); ``%2F`` would silently become a folder separator, so it is refused as ``%00`` is."""
    with pytest.raises(InvalidInput) as refused:
        local_path(url, "--input", query=True)
    message = refused.value.message
    assert message.startswith(f"--input {url!r}: ") and said in message


def test_spark_refuses_a_local_input_path_holding_a_colon() -> None:
    from dhow.batch.spark import _hadoop_path

    with pytest.raises(InvalidInput, match="holding ':'"):
        _hadoop_path("file:///data/a:b%3F")
    assert _hadoop_path("file:///data/run%3F1") == "file:///data/run\\?1"


def test_a_question_mark_in_a_folder_of_a_plain_payload_log_path_is_that_folder_s() -> None:
    from dhow.monitoring.payload_sinks import open_sink

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "logs?max_bytes=1"
        folder.mkdir()
        sink = open_sink(str(folder / "e.jsonl"))
        try:
            assert sink.kind == "file"
        finally:
            sink.close(1.0)
