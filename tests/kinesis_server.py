"""A real Kinesis-API server for the stream tests: moto's server (PyPI ``moto[server]``, in the dev extra) on
127.0.0.1 and a free port; and the few client calls the tests make (streams, put, read)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port, unavailable, wait_until

#: what boto3 needs to talk to the local server (it checks no credential)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Kinesis:
    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client("kinesis", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip

    def url(self, stream: str, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"region": "us-east-1", "endpoint": self.endpoint, **options}.items())
        return f"kinesis://{stream}?{query}"

    def create_streams(self, *names: str, shards: int = 4) -> None:
        client = self.client()
        for name in names:
            client.create_stream(StreamName=name, ShardCount=shards)

    def put(self, stream: str, messages: Iterable[tuple[str, bytes]]) -> int:
        client = self.client()
        batch: list[dict[str, Any]] = []
        count = 0
        for key, value in messages:
            batch.append({"PartitionKey": key, "Data": value})
            if len(batch) == 500:
                count += self._put(client, stream, batch)
                batch = []
        return count + (self._put(client, stream, batch) if batch else 0)

    @staticmethod
    def _put(client: Any, stream: str, batch: list[dict[str, Any]]) -> int:
        answer = client.put_records(StreamName=stream, Records=batch)
        assert answer["FailedRecordCount"] == 0, answer
        return len(batch)

    def read_all(self, stream: str) -> list[dict[str, Any]]:
        """Every record of every shard of the stream, from its start (each with its ``ShardId``)."""
        client = self.client()
        records: list[dict[str, Any]] = []
        for shard in client.list_shards(StreamName=stream)["Shards"]:
            iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                                 ShardIteratorType="TRIM_HORIZON")["ShardIterator"]  # fmt: skip
            while iterator:
                answer = client.get_records(ShardIterator=iterator, Limit=10000)
                if not answer["Records"]:
                    break
                records.extend({**r, "ShardId": shard["ShardId"]} for r in answer["Records"])
                iterator = answer.get("NextShardIterator")
        return records

    def until(self, stream: str, keys: set[str], timeout: float = 120.0) -> list[dict[str, Any]]:
        """The stream's records once one with each partition key of ``keys`` is there (or the time ran out)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.read_all(stream)
            if keys <= {r["PartitionKey"] for r in records} or time.monotonic() > deadline:
                return records
            time.sleep(0.5)


def start_kinesis(folder: Path) -> Iterator[Kinesis]:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable(f"no local Kinesis: moto[server] and boto3 are needed ({exc}); pip install -e '.[dev,kinesis]'")
    port = free_port()
    log = (folder / "moto.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=log)  # fmt: skip
    kinesis = Kinesis(f"http://127.0.0.1:{port}", process)
    try:
        wait_until(lambda: _answers(kinesis), 60, "the local Kinesis server answering")
        yield kinesis
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _answers(kinesis: Kinesis) -> bool:
    try:
        kinesis.client().list_streams()
    except Exception:
        return kinesis.process.poll() is not None  # a dead server: wait_until returns and the test says why
    return True
