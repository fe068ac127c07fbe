"""The instance channel on its own: arrays through real memfd regions and a real SOCK_SEQPACKET socket pair,
regions replaced when a batch outgrows them, and malformed headers or regions refused with a ModelFault."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from dhow.core.errors import ModelFault
from dhow.core.model_config import TensorSpec
from dhow.scheduling.execution import RowParts
from dhow.scheduling.instances.shm_channel import MAX_MESSAGE, Channel, Inbox, Outbox, SharedRegion, region_size_for

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="process instances need Linux")


@pytest.fixture
def ends() -> Iterator[tuple[Channel, Channel]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender, receiver = Channel(left), Channel(right)
    yield sender, receiver
    sender.close()
    receiver.close()


def _through(
    sender: Channel, receiver: Channel, outbox: Outbox, inbox: Inbox, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    header, grown = outbox.pack(arrays)
    sender.send({"tensors": header}, grown.fd if grown is not None else None)
    received = receiver.receive()
    assert received is not None
    message, fd = received
    return inbox.unpack(message["tensors"], fd, copy=False)


def test_every_kind_of_array_arrives_equal_and_read_only(ends: tuple[Channel, Channel]) -> None:
    sender, receiver = ends
    outbox, inbox = Outbox("dhow-test-in"), Inbox()
    words = np.empty((2, 2), dtype=np.object_)
    words[:] = [[b"a", "\u00e9t\u00e9"], [b"", b"\x00\xff"]]
    sent = {
        "fp32": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # not contiguous
        "fp16": np.array([[0.5, -1.25]], dtype=np.float16),
        "bool": np.array([True, False, True]),
        "int64": np.array([-(2**62), 2**62], dtype=np.int64),
        "big_endian": np.array([1.5, 2.5], dtype=">f8"),
        "text": np.array(["ab", "cde"]),
        "bytes": words,
        "empty": np.zeros((0, 3), dtype=np.float64),
        "scalar": np.array(7, dtype=np.int32),
    }
    got = _through(sender, receiver, outbox, inbox, sent)
    assert list(got) == list(sent)
    for name, array in sent.items():
        if name == "bytes":
            continue
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)
        assert not got[name].flags.writeable, name
    # BYTES arrive as the doors carry them: bytes, str encoded as UTF-8
    assert got["bytes"].dtype == np.object_ and got["bytes"].tolist() == [
        [b"a", "\u00e9t\u00e9".encode()],
        [b"", b"\x00\xff"],
    ]
    outbox.close()
    inbox.close()


def test_a_batch_that_outgrows_the_region_gets_a_larger_one(ends: tuple[Channel, Channel]) -> None:
    sender, receiver = ends
    outbox, inbox = Outbox("dhow-test-grow"), Inbox()
    small = {"x": np.ones((4, 8), dtype=np.float32)}
    _through(sender, receiver, outbox, inbox, small)
    first = outbox.region
    assert first is not None
    big = {"x": np.arange(first.size, dtype=np.float64)}  # eight times the region
    got = _through(sender, receiver, outbox, inbox, big)
    assert outbox.region is not first and outbox.region is not None and outbox.region.size >= big["x"].nbytes
    np.testing.assert_array_equal(got["x"], big["x"])
    # the same region serves the next batch that fits: no descriptor is sent again
    header, grown = outbox.pack(small)
    assert grown is None
    copied = inbox.unpack(header, None, copy=True)
    np.testing.assert_array_equal(copied["x"], small["x"])
    assert copied["x"].flags.writeable
    outbox.pack({"x": np.zeros((4, 8), dtype=np.float32)})  # the next batch rewrites the region...
    np.testing.assert_array_equal(copied["x"], small["x"])  # ...and a copy does not change
    outbox.close()
    inbox.close()


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (["x", "<f4", [4], 1 << 30, 16], "outside the shared-memory region"),
        (["x", "<f4", [4], 0, 12], "does not fit 12 bytes"),
        (["x", "|O", [1], 0, 8], "does not fit"),
        (["x", "no-such-dtype", [1], 0, 4], "cannot be read"),
        (["x", "<f4", [-1], 0, 4], "malformed tensor entry"),
        (["x", "<f4", [1]], "malformed tensor entry"),
        (["x", "BYTES", [3], 0, 8], "cannot be read"),  # two empty elements, not three,
    ],
)
def test_a_malformed_header_is_refused(entry: list[object], reason: str) -> None:
    outbox, inbox = Outbox("dhow-test-bad"), Inbox()
    header, grown = outbox.pack({"x": np.zeros(4, dtype=np.float32)})
    assert grown is not None
    inbox.unpack(header, os.dup(grown.fd), copy=True)
    with pytest.raises(ModelFault, match=reason):
        inbox.unpack([entry], None, copy=True)
    with pytest.raises(ModelFault, match="without its tensor list"):
        inbox.unpack({"x": 1}, None, copy=True)
    outbox.close()
    inbox.close()


def test_a_region_that_could_shrink_is_refused() -> None:
    unsealed = os.memfd_create("dhow-test-unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 4096)
    with pytest.raises(ModelFault, match="without its seals"):
        SharedRegion.attach(unsealed)
    read_end, write_end = os.pipe()
    with pytest.raises(ModelFault, match="cannot map a shared-memory region"):
        SharedRegion.attach(read_end)
    with pytest.raises(OSError):  # the descriptor it refused is closed, not leaked
        os.fstat(read_end)
    os.close(write_end)


def test_after_a_region_that_cannot_be_mapped_no_stale_region_answers() -> None:
    outbox, inbox = Outbox("dhow-test-stale"), Inbox()
    header, grown = outbox.pack({"x": np.ones(4, dtype=np.float32)})
    assert grown is not None
    inbox.unpack(header, os.dup(grown.fd), copy=True)
    read_end, write_end = os.pipe()
    with pytest.raises(ModelFault, match="cannot map"):
        inbox.unpack(header, read_end, copy=True)
    # the sender writes into the region that failed from now on: the old one must not answer in its place
    with pytest.raises(ModelFault, match="outside the shared-memory region"):
        inbox.unpack(header, None, copy=True)
    os.close(write_end)
    outbox.close()
    inbox.close()


def test_a_long_label_is_cut_to_whole_characters_within_the_name_limit() -> None:
    region = SharedRegion.create(1, "dhow-" + "\u00fc" * 200)  # 405 bytes of UTF-8; memfd names hold 249
    try:
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:dhow-" + "\u00fc" * 97 + " ")
    finally:
        region.close()


def test_the_channel_reports_a_closed_end_and_refuses_oversized_messages(ends: tuple[Channel, Channel]) -> None:
    sender, receiver = ends
    with pytest.raises(ModelFault, match="exceeds"):
        sender.send_bytes(b"x" * (MAX_MESSAGE + 1))
    sender.send({"n": 1})
    sender.close()
    assert receiver.receive() == ({"n": 1}, None)
    assert receiver.receive() is None


def test_first_region_size_comes_from_the_declared_tensors() -> None:
    specs = (
        TensorSpec("x", "FP32", (-1, 32)),
        TensorSpec("mask", "BOOL", (-1, 3)),
        TensorSpec("text", "BYTES", (-1, 1)),  # unknown size: not counted
        TensorSpec("ragged", "FP32", (-1, -1)),  # unknown size: not counted
    )
    assert region_size_for(specs, 10) == 10 * 32 * 4 + 64  # 10 * 3 bools, aligned to 64 bytes
    assert region_size_for((TensorSpec("x", "INT64", (5,)),), 0) == 64


def test_a_batchs_requests_are_written_row_by_row_as_their_concatenation(ends: tuple[Channel, Channel]) -> None:
    """RowParts (a batch the batcher did not concatenate) arrive as np.concatenate would have made them, the
    region growing for them; parts that cannot go row by row (BYTES) are concatenated first."""
    sender, receiver = ends
    outbox, inbox = Outbox("dhow-test-in"), Inbox()
    rng = np.random.default_rng(3)
    for rows in ([1, 3, 2], [64, 64], [5]):
        features = [rng.random((n, 4)).astype(np.float32)[:, ::-1] for n in rows]  # views, not contiguous
        ids = [np.arange(n, dtype=np.int64) + 100 * i for i, n in enumerate(rows)]
        words = [np.array([f"w{i}"] * n, dtype=np.object_) for i, n in enumerate(rows)]
        got = _through(sender, receiver, outbox, inbox, RowParts({"x": features, "id": ids, "w": words}))
        np.testing.assert_array_equal(got["x"], np.concatenate(features))
        assert got["x"].dtype == np.float32
        np.testing.assert_array_equal(got["id"], np.concatenate(ids))
        assert [bytes(value) for value in got["w"]] == [w.encode() for part in words for w in part]
    outbox.close()
    inbox.close()
