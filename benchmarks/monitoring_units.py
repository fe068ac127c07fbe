"""Instructions of the monitoring work done beside the request's path, per unit, without a server.

    python benchmarks/monitoring_units.py            # every unit, under valgrind (about a minute)

``instructions.py`` counts a server's threads over a run, but valgrind slows the server fifty-fold, so work done
per second rather than per request (an OTLP post a second, the payload writer's reports, a drift score every 30 s)
looks fifty times dearer per request there than it is. This counts the per-request units alone, each run
``--count`` times in a process under callgrind, minus the same process running none:

- ``trace``: a traced request on the event loop: sampled and begun by the door, kept by the batcher's
  ``record_batch`` (2 traced requests in a batch of 16), finished, queued and written into a frame (8 a frame);
- ``spans``: a traced request in tracing's writer process (``dhow.serving.trace_writer``): its frame decoded, its
  spans made and written as OTLP protobuf (``TraceWriter.render_chunk``) in chunks of 512 as its sink's thread
  takes them from its queue, each an export;
- ``render``: one payload event masked and rendered as a CloudEvent by the writer process (tabular: its JSON body
  embedded as it came; outputs as numbers: in sources since 2026-12-07's JSON answer, an answered request's, its
  outputs cut out of the REST door's answer as sent; before, an offered event's, its outputs' arrays), in chunks of
  64 as its sink's thread takes them;
- ``frame``: one payload event offered and written into a frame on the event loop (``PayloadLog.offer``, then
  one frame of 8 events, their JSON bodies after them);
- ``answered``: one answered request's payload work on the event loop, as the data plane does it since 2026-12-07
  (``PayloadLog.answered`` on its path, its event made in a frame of 8 by ``PayloadLog._frame``; sources from
  before have no ``answered``).
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("trace", "spans", "render", "frame", "answered")
#: the events the payload writer renders at once in the ``render`` unit (a 10 ms frame at ~6k requests a second, as
#: the server handed them over until 2026-12-06; a 50 ms frame is now ~300: kept at 64 so that figures stay comparable)
_CHUNK = 64
#: in the ``trace`` and ``spans`` units: the traced requests of a frame, the requests of a batch and those of them
#: traced (the first's batch span links them)
_TRACED, _BATCH, _TRACED_A_BATCH = 8, 16, 2


def _event(body: bytes | None) -> list[object]:
    rng = np.random.default_rng(0)
    inputs: object = len(body) if body is not None else [["input", "FP32", [1, 32], rng.standard_normal((1, 32))]]
    from dhow.core.types import InferenceRequest

    outputs: object = [["label", "INT64", [1], np.array([1])],
                       ["probabilities", "FP32", [1, 2], rng.random((1, 2)).astype(np.float32)]]  # fmt: skip
    if "payload_item" not in InferenceRequest.__slots__:  # (sources before 2026-12-07's JSON answer: name -> array)
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
    log._maskings, log._new_maskings, log._masking_count, log._by_config = {}, [], 0, {}
    log._numbering, log._unframed, log._unmasked = threading.Lock(), 0, set()
    log._bodies, log._outputs = [], []  # (what older sources' ``offer`` appends to)
    log.capacity_bytes, log._bytes = 1 << 62, 0  # (sources since 2026-12-08: the queue's bytes)
    return log


def _tracer() -> Any:
    """A tracer as the event loop finds it (every request sampled), without its writer process: its flush already
    scheduled (the caller frames what is queued)."""
    from dhow.monitoring.tracing import Tracing

    tracing = Tracing.__new__(Tracing)
    tracing._queue, tracing.capacity, tracing._gone, tracing._scheduled = collections.deque(), 1 << 30, False, True
    tracing.ratio, tracing.monotonic_offset = 1.0, 1_700_000_000_000_000_000
    tracing.skip = 1  # (every request its turn; sources before the count down draw by ``ratio``)
    return tracing


def _traced_frame(tracing: Any, first: int) -> bytes:
    """A frame's worth of sampled requests (``_TRACED``) as the event loop traces them: sampled and begun by the
    door, kept by the batcher's ``record_batch`` (batches of ``_BATCH`` requests, ``_TRACED_A_BATCH`` of them
    traced: about what a ratio of 0.1 leaves at c=16), finished and queued, then framed as its flush does."""
    from dhow.monitoring.tracing import record_batch

    label = {"dhow.model": "tabular", "dhow.version": "1", "dhow.batch.rows": _BATCH}
    for batch in range(first, first + _TRACED, _TRACED_A_BATCH):
        traces: list[Any] = [None] * _BATCH
        for n in range(_TRACED_A_BATCH):
            sampled = tracing.sample(None)
            trace = tracing.begin(sampled, "tabular", f"r-{batch + n}", (1_000_001, 1_000_002, 1_000_003))
            traces[n * _BATCH // _TRACED_A_BATCH] = trace
        record_batch(traces, label, 4, 5, [1] * _BATCH)
        for trace in traces:
            if trace is not None:
                trace.finish("1", 1_000_006)
    framed: bytes = tracing._frame(list(tracing._queue))
    tracing._queue.clear()
    return framed


def _trace_unit(unit: str, count: int) -> None:
    """``trace``: ``_traced_frame`` for ``count`` requests; ``spans``: a frame of them decoded and rendered as the
    writer's sink thread does (``TraceWriter.render_chunk``), exports of 512 requests."""
    from dhow.core.frames import decode_frames
    from dhow.monitoring.otlp import export_request_of
    from dhow.serving.trace_writer import TraceWriter

    tracing = _tracer()
    if unit == "trace":
        for first in range(0, count, _TRACED):
            _traced_frame(tracing, first)
        return
    framed = _traced_frame(tracing, 0)
    writer = TraceWriter.__new__(TraceWriter)  # its render alone: no sink, no threads
    queued: list[Any] = []
    for n in range(0, count, _TRACED):  # the frames queued, taken by the sink's thread in chunks of 512 (its export)
        queued += decode_frames(bytearray(framed))[0]
        if len(queued) >= 512 or n + _TRACED >= count:
            rendered, failures = writer.render_chunk(queued)
            assert not failures, failures
            export_request_of(b"", "dhow", b"".join(fields for _, fields in rendered))
            queued = []


def run_unit(unit: str, count: int) -> None:
    """Set up, then do ``count`` units (0: only the set-up)."""
    if unit in ("trace", "spans"):
        _trace_unit(unit, count)
    elif unit == "render":
        from dhow.core.frames import split_frames
        from dhow.core.types import InferenceRequest
        from dhow.governance.masking import Masker, parse_masking
        from dhow.monitoring.payload_log import read_events
        from dhow.serving.payload_writer import Writer

        masker = Masker(parse_masking(None, "pii"), b"")
        if "payload_item" in InferenceRequest.__slots__:  # (sources since 2026-12-07: the JSON answer as sent)
            log, answer = answered_log()
            answer()
            frame = log._frame(list(log._queue))
        else:
            frame = _offered_frame(_body(), masker)
        event = read_events(split_frames(bytearray(frame))[0])[1][0]
        writer = Writer.__new__(Writer)  # its render alone: no sink, no threads
        writer._maskers, writer.source = {1: masker}, "dhow://bench"
        chunk = getattr(writer, "render_chunk", None)
        if chunk is None:  # older sources: an event at a time
            for _ in range(count):
                writer.render(event)
        for done in range(0, count if chunk is not None else 0, _CHUNK):  # the sink's thread takes chunks
            chunk([event] * min(_CHUNK, count - done))
    elif unit == "answered":
        _answered_unit(count)
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


def _answered_unit(count: int) -> None:
    """``count`` answered ``tabular`` requests (a REST JSON body, two outputs) as the data plane hands them to the
    payload log (and the REST door its JSON answer, in sources that take it), its queue framed every 8."""
    log, answer = answered_log()
    for n in range(count):
        answer()
        if n % 8 == 7:  # as its flush does
            log._frame(list(log._queue))
            log._queue.clear()


def answered_log(body: bytes | None = None) -> tuple[Any, Callable[[], None]]:
    """A payload log without its writer process, and what answers one ``tabular`` request to it: the data plane's
    ``PayloadLog.answered``, then, in sources since 2026-12-07 that take it, the REST door's answer as it sent it
    put in the item (``InferenceRequest.payload_item``). ``body``: the request's JSON body (``_body()`` unless
    given)."""
    from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Tensor
    from dhow.core.wire.v2 import encode_response
    from dhow.governance.masking import Masker, parse_masking

    body = body or _body()
    masker = Masker(parse_masking(None, "pii"), b"")
    log = _queue_alone()
    log.use_masking(lambda config: masker)
    config = argparse.Namespace(name="tabular")
    placement = (config, "", None, Caller("anonymous", "default", "req-0001"))
    rng = np.random.default_rng(0)
    request = InferenceRequest("tabular", [Tensor("input", "FP32", [1, 32], rng.standard_normal((1, 32)))])
    request.json_body = body
    outputs = [Tensor("label", "INT64", [1], np.array([1])),
               Tensor("probabilities", "FP32", [1, 2], rng.random((1, 2)).astype(np.float32))]  # fmt: skip
    response = InferenceResponse("tabular", "1", outputs)
    encoded = encode_response(response, request)[0]
    start = time.perf_counter()

    def answer() -> None:
        log.answered(placement, start, request, response)
        item = getattr(request, "payload_item", None)
        if item is not None:  # as the REST door does
            item[-1] = encoded

    return log, answer


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
