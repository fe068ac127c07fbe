"""``dhow stream run --workers 2``: two consumer processes of one group share the partitions; one killed with
SIGKILL mid-stream is restarted by the supervisor and nothing is lost (every request answered with the right
value, every poison message in the dead-letter topic with its reason); SIGTERM stops the whole at exit status 0."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from dhow.streaming.workers import REFUSED, _die_with_parent
from tests.conftest import wait_until, write_model
from tests.kafka_broker import Broker, start_broker
from tests.stream_processes import headers_of, replies_by_key, slow_doubler, start_stream, stop

COUNT = 2000
#: messages no model can answer, each for its own reason (the dead-letter header names it)
POISON = {
    b"p-json": (b"{not json", "malformed JSON"),
    b"p-name": (b'{"z": [1.0]}', "no input 'z'"),
    b"p-bool": (b'{"x": [true]}', "boolean"),
}


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


def _workers(data: Path) -> dict[int, dict[str, Any]]:
    """Each worker's status by its number ({} until written)."""
    found = {}
    for path in (data / "streams").glob("*@*.json"):
        try:
            status = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:  # pragma: no cover - replaced in one rename, never half written
            continue
        found[int(status["worker"])] = status
    return found


def test_two_workers_share_a_group_and_one_killed_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    manifest = (
        "runtime: python\ninputs:\n  - {name: x, datatype: FP32, shape: [-1, 1]}\n"
        "outputs:\n  - {name: y, datatype: FP32, shape: [-1, 1]}\nmax_batch_size: 8\n"
    )
    write_model(repository, "slow", manifest, {"1/model.py": slow_doubler(0.04)})
    source, sink, dead = "workers.requests", "workers.replies", "workers.dead"
    broker.create_topics(source, sink, dead)
    messages = [(str(i).encode(), orjson.dumps({"x": [float(i)]}), []) for i in range(COUNT)]
    for n, (key, (value, _)) in enumerate(POISON.items()):  # among the requests, not at the end
        messages.insert(500 * (n + 1), (key, value, []))
    broker.produce(source, messages)
    data = tmp_path / "data"
    args = [
        "--source", broker.url(source, group_options=True), "--sink", broker.url(sink), "--dead-letter",
        broker.url(dead), "--model", "slow", "--max-in-flight", "100", "--workers", "2",
    ]  # fmt: skip
    replies_seen = broker.tail(sink)
    supervisor = start_stream(repository, data, broker, *args)
    try:
        wait_until(lambda: all(_workers(data).get(n, {}).get("assignment") for n in (1, 2)), 90, "both assigned")
        wait_until(lambda: replies_seen.count() >= 300, 90, "the first replies")
        killed = int(_workers(data)[1]["pid"])
        os.kill(killed, signal.SIGKILL)
        answered_at_kill = replies_seen.count()
        # the supervisor starts worker 1 again: a new process, which joins the group and answers
        wait_until(lambda: int(_workers(data)[1]["pid"]) != killed, 60, "worker 1 restarted")
        replies = replies_seen.until_keys({str(i).encode() for i in range(COUNT)}, timeout=180)
        restarted = _workers(data)[1]
        letters = broker.read_all(dead, len(POISON))
    finally:
        replies_seen.close()
        code = stop(supervisor)
    log = (data / "stream.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert answered_at_kill < COUNT, "the topic was answered before the kill: nothing was proved"
    assert "stream worker 1 exited with status -9; restarting it" in log
    by_key = replies_by_key(replies)
    assert sorted(by_key) == list(range(COUNT)), f"lost: {sorted(set(range(COUNT)) - set(by_key))[:20]}"
    assert all(orjson.loads(m.value())["y"] == [2.0 * i] for i, v in by_key.items() for m in v)
    assert restarted["state"] == "running" and restarted["pid"] != killed
    reasons = {m.key(): headers_of(m)["dhow-error-reason"].decode() for m in letters}
    assert {key: m.value() for key, m in ((m.key(), m) for m in letters)} == {k: v for k, (v, _) in POISON.items()}
    assert all(why in reasons[key] for key, (_, why) in POISON.items()), reasons
    # both workers gone with the supervisor
    for status in _workers(data).values():
        with pytest.raises(ProcessLookupError):
            os.kill(int(status["pid"]), 0)


def test_workers_refused_at_start_stop_the_supervisor_at_the_refusals_exit_status(tmp_path: Path) -> None:
    # no dead-letter destination: every worker refuses to start (exit 2), as ``dhow stream run`` alone does; the
    # others, refused too or stopped while starting, must not turn the supervisor's status into another one
    command = [
        sys.executable, "-m", "dhow.cli", "stream", "run", "--repository", str(tmp_path), "--data-dir",
        str(tmp_path / "data"), "--model", "tabular", "--source", "kafka://127.0.0.1:9/requests", "--sink",
        "kafka://127.0.0.1:9/replies", "--workers", "3",
    ]  # fmt: skip
    alone = subprocess.run(command[:-2], capture_output=True, text=True, timeout=120, check=False)
    supervised = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert alone.returncode == REFUSED == 2, alone.stderr[-2000:]
    assert "no dead-letter destination" in alone.stderr + alone.stdout
    assert supervised.returncode == REFUSED, supervised.stderr[-3000:]
    assert "was refused at start (exit status 2): stopping" in supervised.stderr


@pytest.mark.parametrize("orphaned", [False, True])
def test_a_worker_whose_supervisor_died_before_it_armed_the_death_signal_exits(orphaned: bool) -> None:
    # the race of a worker started as the supervisor dies, played by naming another pid as its parent: it
    # exits before it runs anything, as the death signal would have made it; under its living parent it runs
    parent = 1 if orphaned else os.getpid()
    worker = subprocess.run(
        [sys.executable, "-c", "print('ran')"],
        preexec_fn=functools.partial(_die_with_parent, parent),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if orphaned:
        assert (worker.returncode, worker.stdout) == (128 + signal.SIGTERM, b"")
    else:
        assert (worker.returncode, worker.stdout) == (0, b"ran\n")
