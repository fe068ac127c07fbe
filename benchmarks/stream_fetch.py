"""How fast a bare consumer with dhow's prefetch settings can read a backlog, with no model and no replies.

    PYTHONPATH=src python benchmarks/stream_fetch.py [--messages 200000] [--rate 80000]

Starts tansu (as ``streaming.py`` does), writes ``--messages`` one-row json requests to a topic of 4 partitions,
and reads them with two consumer processes of one group (two partitions each), each taking at most ``--rate``
messages a second (it sleeps as long as a consumer of that speed would work on each poll), once per setting:
dhow's source settings as they are (``KafkaSource``: an 8 MB prefetch, ``fetch.queue.backoff.ms=10``), the same
with librdkafka's default back-off (1 s), and with librdkafka's default prefetch (64 MB). Printed per consumer:
its rate and the seconds it waited on an empty queue before the backlog was drained. The client alone, so the
figures show what the prefetch settings allow, below any model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kafka_broker import GROUP_OPTIONS, start_broker  # noqa: E402

#: one consumer: reads until the topic stays empty for 2 s, then prints its rate and its waits on an empty queue
CONSUMER = r"""
import json, sys, time
from confluent_kafka import Consumer
servers, topic, group, settings, rate = sys.argv[1:4] + [json.loads(sys.argv[4]), float(sys.argv[5])]
consumer = Consumer({"bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", **settings})
consumer.subscribe([topic])
count, empty_s, waited_s, first, last = 0, 0.0, 0.0, 0.0, time.perf_counter()
while True:
    asked = time.perf_counter()
    messages = consumer.consume(500, 0)
    if not messages:
        one = consumer.poll(0.1)
        messages = [one] if one is not None else []
        if not messages and first and time.perf_counter() - last > 2:
            break
        if first and not messages:  # counted once more messages came: the drained topic's end is no wait
            waited_s += time.perf_counter() - asked
    messages = [m for m in messages if m.error() is None]
    if messages:
        last = time.perf_counter()
        first = first or asked
        empty_s, waited_s = empty_s + waited_s, 0.0
        count += len(messages)
        time.sleep(len(messages) / rate)
consumer.close()
print(f"{count} messages, {count / (last - first):,.0f} msg/s, {empty_s:.2f} s waiting on an empty queue", flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=80_000, help="the most each consumer takes a second")
    args = parser.parse_args()
    dhow = {"queued.max.messages.kbytes": 8192, "fetch.queue.backoff.ms": 10, "isolation.level": "read_committed"}
    dhow |= dict(option.split("=") for option in GROUP_OPTIONS.split("&"))
    settings = {
        "dhow's": dhow,
        "dhow's, librdkafka's back-off (1 s)": {**dhow, "fetch.queue.backoff.ms": 1000},
        "dhow's, librdkafka's prefetch (64 MB)": {**dhow, "queued.max.messages.kbytes": 65536},
    }
    value = json.dumps({"input": [0.123456789] * 32}).encode()
    run = start_broker()
    broker = next(run)
    try:
        broker.create_topics("backlog")
        broker.produce("backlog", ((str(i).encode(), value, []) for i in range(args.messages)))
        for number, (name, options) in enumerate(settings.items()):
            command = [sys.executable, "-c", CONSUMER, broker.servers, "backlog", f"g{number}", json.dumps(options),
                       str(args.rate)]  # fmt: skip
            consumers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
            lines = [consumer.communicate()[0].strip() for consumer in consumers]
            print(f"{name} settings: " + "; ".join(lines), flush=True)
    finally:
        run.close()


if __name__ == "__main__":
    main()
