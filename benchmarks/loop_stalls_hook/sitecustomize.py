"""Loaded by every Python process started with this folder on PYTHONPATH (benchmarks/loop_stalls.py puts it there for
the servers it measures): with ``DHOW_LOOP_STALLS`` set, the process's event loop gets ``loop_watch``'s heartbeat and
watchdog; with ``DHOW_STALLS_WRITER_POLICY`` (``batch``, ``normal``), a writer process of the server's own that
serves requests' data (``python -m dhow.serving.*_writer``: the payload log's, tracing's; not the audit trail's
``dhow.governance.audit_writer``) runs under that scheduling policy (an experiment). Without them, nothing."""

import os

if os.environ.get("DHOW_LOOP_STALLS"):
    import loop_watch

    loop_watch.install(os.environ["DHOW_LOOP_STALLS"])

if os.environ.get("DHOW_STALLS_WRITER_POLICY"):
    with open("/proc/self/cmdline", "rb") as _cmdline:
        _words = _cmdline.read().split(b"\0")
    if any(word.startswith(b"dhow.serving.") and word.endswith(b"_writer") for word in _words):
        _policy = {"batch": os.SCHED_BATCH, "normal": os.SCHED_OTHER}[os.environ["DHOW_STALLS_WRITER_POLICY"]]
        os.sched_setscheduler(0, _policy, os.sched_param(0))
