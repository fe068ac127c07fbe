"""``dhow audit``: verify, export and tail the audit trail, reading its database directly (no server needed).

The store is found as the server finds it (``dhow.settings``): ``--store URL``, ``$DHOW_AUDIT_STORE``, the
``--config`` file's ``audit_store``, else ``audit.sqlite3`` in the data folder (``--data-dir``, ``$DHOW_DATA_DIR``,
the file's ``data_dir``, ``./.dhow``). Exit status: 0 on success, 1 when ``verify`` found
problems, 2 when the store cannot be opened or read, or an option is wrong.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dhow.commands.table import format_table
from dhow.core.errors import DhowError, NotFound
from dhow.governance.audit import MAX_READ, AuditStore
from dhow.registry.database import parse_url
from dhow.settings import CONFIG_FILE_HELP, resolve_settings

__all__ = ["add_parser", "run"]

_HASH = re.compile(r"^[0-9a-f]{64}$")


def _anchor(text: str) -> tuple[int, str]:
    seq, _, digest = text.strip().partition(":")
    digest = digest.lower()
    if not seq.isdigit() or int(seq) < 1 or not _HASH.match(digest):
        raise argparse.ArgumentTypeError(
            f"expected SEQ:HASH as printed by 'dhow audit verify' (e.g. 1042:{'ab' * 32}), got {text!r}"
        )
    return int(seq), digest


def _count(text: str, least: int = 0, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least or (most is not None and value > most):
        bounds = f"from {least} to {most}" if most is not None else f"of at least {least}"
        raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
    return value


def _lines(text: str) -> int:
    return _count(text, 1, MAX_READ)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dhow audit`` and its actions to the ``dhow`` command."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--store",
        metavar="URL",
        help="the audit store: sqlite:///path or postgresql://... (default $DHOW_AUDIT_STORE, else "
        "audit.sqlite3 in the data folder)",
    )
    where.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="dhow's data folder (default $DHOW_DATA_DIR, else ./.dhow)"
    )
    where.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    audit = commands.add_parser(
        "audit",
        help="verify, export and read the tamper-evident audit trail",
        description="Work with the audit trail: every admin action, denial and inference request, hash-chained.",
    )
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        parents=[where],
        help="check that no record was edited, deleted or moved",
        description="Check the hash chain; exit 1 and name each record that was edited, deleted or moved. "
        "The head printed on success can be kept elsewhere and checked later with --expect-head, which "
        "also catches a truncated trail.",
    )
    verify.add_argument(
        "--expect-head",
        type=_anchor,
        metavar="SEQ:HASH",
        help="a head printed by an earlier verify: that record must still be there, unchanged",
    )
    export = actions.add_parser(
        "export",
        parents=[where],
        help="write the records as JSON lines",
        description="Write the records, hashes included, as JSON lines, oldest first.",
    )
    export.add_argument("--since", type=_count, default=0, metavar="SEQ", help="only records after this seq")
    export.add_argument("--out", type=Path, metavar="FILE", help="write to this file (default standard output)")
    tail = actions.add_parser(
        "tail", parents=[where], help="show the newest records", description="Show the newest records as a table."
    )
    tail.add_argument("-n", dest="count", type=_lines, default=20, metavar="N", help="how many (default 20)")


def run(args: argparse.Namespace) -> int:
    """Runs ``dhow audit ACTION``; answers the exit status."""
    try:
        settings = resolve_settings({"audit_store": args.store, "data_dir": args.data_dir}, config_file=args.config)
        store = _open(settings.audit_url())
    except DhowError as err:
        print(f"dhow audit: {err.message}", file=sys.stderr)
        return 2
    try:
        return _ACTIONS[args.audit_command](store, args)
    except DhowError as err:
        print(f"dhow audit: {err.message}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"dhow audit: {err.strerror or err}: {getattr(err, 'filename', '') or ''}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _open(url: str) -> AuditStore:
    dialect, target = parse_url(url, "audit store")
    if dialect == "sqlite" and not Path(target).is_file():
        # opening would create an empty trail, which verifies as "ok": say that there is none instead
        raise NotFound(f"no audit trail at {target}: give --store URL or --data-dir DIR (or set DHOW_AUDIT_STORE)")
    return AuditStore.open(url)


def _verify(store: AuditStore, args: argparse.Namespace) -> int:
    report = store.verify(expect_head=args.expect_head)
    print(report.describe())
    return 0 if report.ok else 1


def _export(store: AuditStore, args: argparse.Namespace) -> int:
    if args.out is None:
        store.export_jsonl(sys.stdout, since_seq=args.since)
        return 0
    with open(args.out, "w", encoding="utf-8") as out:
        count = store.export_jsonl(out, since_seq=args.since)
    print(f"exported {count} records to {args.out}", file=sys.stderr)
    return 0


def _tail(store: AuditStore, args: argparse.Namespace) -> int:
    head_seq, _ = store.head()
    records = store.read(since_seq=max(0, head_seq - args.count), limit=args.count)
    if not records:
        print("the audit trail is empty")
        return 0
    headers = ("SEQ", "AT", "KIND", "ACTION", "ACTOR", "TENANT", "MODEL", "OUTCOME", "LATENCY")
    # a record without a latency (an admin action) leaves its last cell blank
    print(format_table(headers, (_cells(record) for record in records), empty=""))
    return 0


def _cells(record: Mapping[str, Any]) -> tuple[str, ...]:
    model = record["model"] + (f":{record['version']}" if record["version"] else "")
    latency = "" if record["latency_ms"] is None else f"{record['latency_ms']:.3f} ms"
    fields = ("at", "kind", "action", "actor", "tenant")
    return (str(record["seq"]), *(str(record[name]) for name in fields), model or "-", record["outcome"], latency)


_ACTIONS: dict[str, Callable[[AuditStore, argparse.Namespace], int]] = {
    "verify": _verify,
    "export": _export,
    "tail": _tail,
}
