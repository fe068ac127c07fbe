"""The stream door: consume requests from a topic, answer them through the core, produce the replies.

Transports implement ``Source`` and ``Sink`` (``records``): Kafka (``kafka``) and Kinesis (``kinesis``, its
checkpoints and shard leases in the registry database). Every batch of messages enters the core through its one
admission point as the stream's service identity (``consumer``).
"""

from dhow.streaming.consumer import StreamConsumer, stream_identity
from dhow.streaming.records import DeliveryFailed
from dhow.streaming.runner import StreamGroup, load_stream_models, open_consumer, run_streams
from dhow.streaming.spec import StreamSpec, parse_streams
from dhow.streaming.status import Meter, read_statuses, status_folder

__all__ = [
    "DeliveryFailed",
    "Meter",
    "StreamConsumer",
    "StreamGroup",
    "StreamSpec",
    "load_stream_models",
    "open_consumer",
    "parse_streams",
    "read_statuses",
    "run_streams",
    "status_folder",
    "stream_identity",
]
