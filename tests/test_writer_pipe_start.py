"""The start of a writer process (the payload log's, tracing's) in a server that holds many descriptors (many
connections): its pipes are numbered past 1024, which ``select.select`` refuses; the start waits on them all the
same (a reload starts writers in a server that is serving)."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dhow.monitoring.payload_log import PayloadLog
from dhow.serving.composition import PAYLOAD_WRITER

#: the descriptors the test holds open: the writer's pipes come after them (the lowest free numbers)
_HELD = 1100


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Descriptors numbered up to past ``_HELD`` held open (the soft limit raised for them, then restored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _HELD + 256
    if soft < wanted and hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit of open descriptors ({hard}) is too low for {wanted}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    held: list[int] = []
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        while not held or held[-1] < _HELD:
            held.append(os.dup(null))
        yield
    finally:
        for descriptor in held:
            os.close(descriptor)
        os.close(null)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("many_descriptors")
def test_a_writer_whose_pipes_are_numbered_past_1024_starts(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = PayloadLog(f"file://{tmp_path}/payloads.jsonl", capacity=100, source="dhow://test", command=PAYLOAD_WRITER,
                     registry=registry)  # fmt: skip
    try:
        assert min(log._in, log._out) > 1024
        assert log.kind == "file"
    finally:
        log.close()
    assert log._process.returncode == 0
