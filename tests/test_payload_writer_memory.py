"""The payload log's writer process keeps the memory a frame freed for the next one (no page faults a frame)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import pytest

from dhow.governance.masking import Masker, parse_masking
from dhow.monitoring.payload_log import frame_events
from tests.payload_writer_process import start_payload_writer

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() or platform.libc_ver()[0] != "glibc", reason="glibc's allocator, /proc"
)

_BODY = b'{"inputs":[{"name":"input","shape":[1,32],"datatype":"FP32","data":[' + b",".join(b"0.5" for _ in range(32))
_BODY += b"]}]}"


#: ``tabular``'s JSON answer, as the REST door sends it (after the body, in place of the outputs' arrays)
_ANSWER = (
    b'{"model_name":"tabular","model_version":"1","outputs":[{"name":"label","datatype":"INT64","shape":[1],'
    b'"data":[1]},{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]}]}'
)


def _frame(n: int, per: int, masking: dict[str, object] | None) -> bytes:
    """A frame of ``per`` events shaped as ``tabular``'s over REST, as ``PayloadLog._frame`` writes it."""
    events = [[f"r-{n}-{k}", "tabular", "1", "anonymous", "default", "", "success", "", 1.0 + k, 0.001, {},
               len(_BODY), len(_ANSWER), 1, 1] for k in range(per)]  # fmt: skip
    maskings = [(1, masking)] if masking else []
    return frame_events(maskings, time.time(), events, [_BODY, _ANSWER] * per)


def _minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def test_frames_after_the_first_take_no_fresh_pages(tmp_path: Path) -> None:
    out = tmp_path / "payloads.jsonl"
    writer, _ = start_payload_writer(out, capacity=10_000)
    assert writer.stdin is not None
    per, masking = 350, Masker(parse_masking(None, "pii"), b"").spec()
    lines = 0
    try:
        faults = 0
        written = out.open("rb")
        for n in range(60):
            if n == 20:  # warm: the allocator's heaps as large as a frame needs
                faults = _minor_faults(writer.pid)
            writer.stdin.write(_frame(n, per, masking if n == 0 else None))
            writer.stdin.flush()
            while lines < (n + 1) * per:  # all written: the next (the writer's queue never full)
                assert writer.poll() is None, "the writer stopped"
                lines += written.read().count(b"\n")
                time.sleep(0.005)
        faults = _minor_faults(writer.pid) - faults
        written.close()
    finally:
        writer.stdin.close()
        writer.wait(30)
    assert writer.returncode == 0
    assert out.read_bytes().count(b"\n") == 60 * per
    # (freed memory given back to the system and taken again: ~95 faults a frame of 350 events, each page zeroed)
    assert faults < 40 * 10, f"{faults / 40:.0f} page faults a frame"
