"""Instructions of the monitoring work done beside the request's path, per unit, without a server.

    python benchmarks/monitoring_units.py            # every unit, under valgrind (about a minute)

``instructions.py`` counts a server's threads over a run, but valgrind slows the server fifty-fold, so work done
per second rather than per request (an OTLP post a second, the payload writer's reports, a drift score every 30 s)
looks fifty times dearer per request there than it is. This counts the per-request units alone, each run
``--count`` times in a process under callgrind, minus the same process running none:

- ``trace``: a sampled request's trace kept and its record written into a frame (8 a frame), on the event loop;
- ``spans``: a traced request's record made into its spans and written as OTLP protobuf, in exports of 512 requests,
  by tracing's writer process (``dhow.serving.trace_writer``);
- ``render``: one payload event masked and rendered as a CloudEvent by the writer process (tabular: its JSON body
  embedded as it came, outputs as numbers), in chunks of 64 as its sink's thread takes them;
- ``frame``: one payload event offered and written into a frame on the event loop (``PayloadLog.offer``, then
  one frame of 8 events, their JSON bodies after them).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("trace", "spans", "render", "frame")
#: the events the payload writer renders at once in the ``render`` unit (a 10 ms frame at ~6k requests a second)
_CHUNK = 64


def _event(body: bytes | None) -> list[object]:
    rng = np.random.default_rng(0)
    inputs: object = len(body) if body is not None else [["input", "FP32", [1, 32], rng.standard_normal((1, 32))]]
    outputs = {"label": np.array([1]), "probabilities": rng.random((1, 2)).astype(np.float32)}
    event = ["req-0001", "tabular", "1", "anonymous", "default", "", "success", "", time.time(), 0.0012, {}, inputs,
             outputs, 1]  # fmt: skip
    if body is not None:  # a JSON body's number of tensors, as PayloadLog.offer appends it
        event.append(1)
    return event


def _body() -> bytes:
    row = np.random.default_rng(1).standard_normal(32).astype(np.float32).tolist()
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": row}]}).encode()


def _offered_frame(body: bytes, masker: object) -> bytes:
    """A frame of one event as the event loop writes it (``PayloadLog.offer``, then its ``_frame``)."""
    log = _queue_alone()
    event = _event(body)[:13]  # as the data plane offers it
    event[11] = (body, 1)
    log.offer(event, masker)  # type: ignore[arg-type]
    frame: bytes = log._frame(list(log._queue))
    return frame


def _queue_alone() -> Any:
    """A payload log's queue, as ``PayloadLog.offer`` finds it, without its writer process (its flush already
    scheduled: the caller frames what is queued)."""
    from dhow.monitoring.payload_log import PayloadLog

    log = PayloadLog.__new__(PayloadLog)
    log._queue, log.capacity, log._gone, log._scheduled = collections.deque(), 1 << 30, False, True
    log._maskings, log._new_maskings, log._masking_count, log._bodies, log._outputs = {}, [], 0, [], []
    return log


def run_unit(unit: str, count: int) -> None:
    """Set up, then do ``count`` units (0: only the set-up)."""
    if unit in ("trace", "spans"):
        import random

        import orjson

        from dhow.core.frames import decode_frames, frame
        from dhow.monitoring import tracing
        from dhow.monitoring.otlp import export_request_of, span_fields
        from dhow.monitoring.tracing import RequestTrace, spans_of

        # what the writer writes a request's spans with (older sources: its spans made, then written)
        fields_of = getattr(tracing, "record_fields", lambda record: span_fields(spans_of(record)))

        sampled = random.getrandbits(128).to_bytes(16, "big"), b""
        records = []
        for n in range(count if unit == "trace" else min(count, 8)):  # a request's life on the event loop
            request = RequestTrace(None, sampled, "tabular", f"r-{n}", (1, 2, 3))  # type: ignore[arg-type]
            request.stage("queue", 3, 4)
            request.stage("compute", 4, 5, {"dhow.model": "tabular", "dhow.version": "1", "dhow.batch.rows": 8})
            request.stage("batch", 4, 5, {"dhow.model": "tabular"}, ((sampled[0].hex(), request.span_id),))
            request.answered_ns, request.end_ns, request.version = 6, 7, "1"
            records.append(request.record())
            if len(records) == 8 and unit == "trace":  # a frame per loop turn: 8 requests a frame
                frame(orjson.dumps(records))
                records = []
        if unit == "spans":  # the writer process: a frame's records decoded, spans made, exports of 512 requests
            received = decode_frames(bytearray(frame(orjson.dumps(records))))[0] if records else []
            done = []
            for n in range(count):
                done.append(fields_of(received[n % len(received)]))
                if len(done) == 512 or n == count - 1:
                    export_request_of(b"", "dhow", b"".join(done))
                    done = []
    elif unit == "render":
        import orjson

        from dhow.core.frames import split_frames
        from dhow.governance.masking import Masker, parse_masking
        from dhow.monitoring.payload_log import read_events
        from dhow.serving.payload_writer import Writer

        masker = Masker(parse_masking(None, "pii"), b"")
        body = _body()
        event = read_events(split_frames(bytearray(_offered_frame(body, masker)))[0])[1][0]
        writer = Writer.__new__(Writer)  # its render alone: no sink, no threads
        writer._maskers, writer.source = {1: masker}, "dhow://bench"
        chunk = getattr(writer, "render_chunk", None)
        if chunk is None:  # older sources: an event at a time
            for _ in range(count):
                writer.render(event)
        for done in range(0, count if chunk is not None else 0, _CHUNK):  # the sink's thread takes chunks
            chunk([event] * min(_CHUNK, count - done))
    else:  # as the event loop does: each event offered (PayloadLog.offer), the queue framed every 8
        from dhow.governance.masking import Masker, parse_masking

        body = _body()
        masker = Masker(parse_masking(None, "pii"), b"")
        log = _queue_alone()
        offered = _event(body)[:13]  # as the data plane offers it
        for n in range(count):
            event = list(offered)
            event[11] = (body, 1)
            log.offer(event, masker)
            if n % 8 == 7:  # as its flush does
                log._frame(list(log._queue))
                log._queue.clear()


def _instructions(unit: str, count: int, src: Path) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                   "--run", unit, "--count", str(count)]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise SystemExit(done.stderr[-2000:])
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--src", type=Path, default=ROOT / "src")
    parser.add_argument("--run", choices=UNITS, help=argparse.SUPPRESS)
    parser.add_argument("--units", nargs="+", choices=UNITS, default=list(UNITS))
    args = parser.parse_args()
    if args.run:
        run_unit(args.run, args.count)
        return
    for unit in args.units:
        extra = _instructions(unit, args.count, args.src) - _instructions(unit, 0, args.src)
        print(f"{unit}: {extra / args.count / 1000:,.1f}k instructions each (over {args.count})", flush=True)


if __name__ == "__main__":
    main()
