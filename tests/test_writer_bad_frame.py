"""A writer process handed a frame it cannot read (a server's bug) stops, but first writes what it took before it
and reports it: nothing taken is lost."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from dhow.core.frames import decode_frames, frame
from dhow.governance.masking import Masker, parse_masking
from dhow.monitoring.payload_log import frame_events
from tests.payload_writer_process import start_payload_writer

_BODY = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[0.5]}]}'
_ANSWER = b'{"model_name":"m","model_version":"1","outputs":[{"name":"y","datatype":"FP32","shape":[1],"data":[1.0]}]}'


def test_a_frame_the_writer_cannot_read_leaves_what_came_before_it_written(tmp_path: Path) -> None:
    out = tmp_path / "payloads.jsonl"
    writer, answers = start_payload_writer(out, capacity=100, stderr=subprocess.PIPE)
    assert writer.stdin is not None and writer.stdout is not None and writer.stderr is not None
    try:
        events = [[f"r-{n}", "m", "1", "", "", "", "success", "", time.perf_counter(), 0.001, {}, len(_BODY),
                   len(_ANSWER), 1, 1] for n in range(3)]  # fmt: skip
        masking = Masker(parse_masking(None, "pii"), b"").spec()
        good = frame_events([[1, masking]], time.time() - time.perf_counter(), events, [_BODY, _ANSWER] * 3)
        writer.stdin.write(good + frame(b"\x00\x00\x00\x09not a frame"))
        writer.stdin.flush()
        assert writer.wait(30) == 1, "a frame it cannot read stops the writer"
    finally:
        if writer.poll() is None:
            writer.kill()
    lines = out.read_bytes().splitlines()
    assert [line.count(b'"request_id":"r-') for line in lines] == [1, 1, 1], "what came before it is written"
    reported = decode_frames(answers + writer.stdout.read())  # (the reports after the ready answer)
    assert sum(report.get("logged", 0) for report in reported) == 3 and not any(r.get("failed") for r in reported)
    assert b"JSONDecodeError" in writer.stderr.read(), "and says why"
