"""A payload log's writer process started as the server starts it (``python -m dhow.serving.payload_writer``, its
settings the first frame), to a JSON Lines file, for tests that feed its pipe frames themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dhow.core.frames import decode_frames, widen_pipe
from dhow.monitoring.payload_log import encode_frame


def start_payload_writer(
    out: Path, capacity: int, stderr: int | None = None
) -> tuple[subprocess.Popen[bytes], bytearray]:
    """The writer, ready to write to ``out`` (its queue ``capacity`` events), and what it answered after its ready
    answer (its reports may follow at once); ``stderr``: ``subprocess.PIPE`` to read what it says there."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    writer = subprocess.Popen([sys.executable, "-m", "dhow.serving.payload_writer"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=stderr, env=env)  # fmt: skip
    assert writer.stdin is not None and writer.stdout is not None
    widen_pipe(writer.stdin.fileno())  # as the server does: a frame in one read
    # (at the normal CPU priority: on a busy machine a writer at the lowest one may wait long for a CPU)
    settings = {"url": f"file://{out}", "source": "dhow://test", "capacity": capacity, "close_timeout_s": 5.0,
                "priority": "normal"}  # fmt: skip
    writer.stdin.write(encode_frame(settings))
    writer.stdin.flush()
    answers = bytearray()
    while not (ready := decode_frames(answers, 1)):
        chunk = os.read(writer.stdout.fileno(), 1 << 16)
        assert chunk, f"the writer stopped: {writer.wait(30)}"
        answers += chunk
    assert ready[0] == {"ready": "file"}, ready
    return writer, answers
