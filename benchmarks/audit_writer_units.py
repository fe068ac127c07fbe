"""Instructions of the audit writer process per inference record, without a server.

    python benchmarks/audit_writer_units.py                     # SQLite, 3,200 records in batches of 64
    python benchmarks/audit_writer_units.py --store postgresql://localhost/dhow_test --keep /tmp/writer.cg

``instructions.py --api-key`` counts the writer process beside the server, but under valgrind the server is slow,
so the writer's batches (and what a transaction costs per record) are not those of a real run. This runs the
writer (``python -m dhow.governance.audit_writer``) alone under callgrind and feeds its pipe from this process as the
server does: one frame per record (``writer_process._frame``), ``--batch`` frames at a time, each batch sent once the
writer acknowledged the one before (so each transaction writes ``--batch`` records, about what a 10 ms linger
gathers at 6,000 requests a second). Printed: the writer's instructions per record, those of a run with no records
taken off (the interpreter's start, the store's opening). The records are inference records as ``serving/guard.py``
makes them with an API key: no details, a latency, a server-made request id.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _frames(count: int) -> list[bytes]:
    from dhow.governance.audit import AuditRecord
    from dhow.governance.audit_writer import encode_frame

    start = time.time()
    return [  # as ``writer_process._frame`` writes a frame of one record
        encode_frame(
            [
                AuditRecord(
                    kind="inference",
                    action="infer",
                    actor="key:bench-invoker",
                    tenant="default",
                    outcome="success",
                    model="tabular",
                    version="1",
                    request_id=f"5f3a9c01{n:08x}",
                    region="",
                    latency_ms=0.8 + (n % 97) * 0.0123456,
                    details={},
                    at_s=start + n * 0.000173,
                ).as_tuple()
            ]
        )
        for n in range(count)
    ]


def _run(url: str, records: int, batch: int, out: Path, src: Path) -> int:
    """The writer's instructions over ``records`` records."""
    from dhow.core.frames import decode_frame_length
    from dhow.governance.audit_writer import encode_frame

    frames = _frames(records)
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
               "dhow.governance.audit_writer"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    writer = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdin is not None and writer.stdout is not None and writer.stderr is not None
    writer.stdin.write(encode_frame(url))
    writer.stdin.flush()
    for first in range(0, records, batch):
        chunk = frames[first : first + batch]
        writer.stdin.write(b"".join(chunk))
        writer.stdin.flush()
        acknowledged = 0
        while acknowledged < len(chunk):
            answer = writer.stdout.read(decode_frame_length(writer.stdout.read(4)))
            found = re.search(rb'"frames":(\d+)', answer)
            if found is None:
                raise SystemExit(f"the writer answered {answer!r}")
            acknowledged += int(found.group(1))
    writer.stdin.close()
    stderr = writer.stderr.read().decode()
    if writer.wait() != 0:
        raise SystemExit(stderr[-2000:])
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise SystemExit(stderr[-2000:])
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=3200)
    parser.add_argument("--batch", type=int, default=64, help="records a transaction")
    parser.add_argument("--store", help="a PostgreSQL URL (its dhow_audit table grows); default: a scratch SQLite file")
    parser.add_argument(
        "--keep", type=Path, help="keep the callgrind file of the run with records here (without records: FILE-0)"
    )
    parser.add_argument("--src", type=Path, default=ROOT / "src")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    with tempfile.TemporaryDirectory() as scratch:
        counts = []
        for records in (0, args.records):
            url = args.store or f"sqlite:///{scratch}/audit-{records}.sqlite3"
            out = Path(scratch) / f"callgrind-{records}.out"
            if args.keep:  # both, to compare function by function: what the records cost is the difference
                out = args.keep if records else args.keep.with_name(f"{args.keep.name}-0")
            counts.append(_run(url, records, args.batch, out, args.src))
    per_record = (counts[1] - counts[0]) / args.records
    print(f"writer: {per_record / 1000:,.1f}k instructions a record ({args.records} records, {args.batch} a "
          f"transaction; {counts[0] / 1e6:,.0f}M to start and stop)")  # fmt: skip


if __name__ == "__main__":
    main()
