"""What one client may make a connection of the native front hold: the sizes the server's SETTINGS announce, and
the frames of a header block, which HTTP/2 leaves unbounded."""

from __future__ import annotations

from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.calls import RECEIVE_WINDOW

#: what a client may send in all before the server's WINDOW_UPDATE on the connection
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_IN = 1024 * 1024
MAX_STREAMS = 1000
MAX_HEADER_LIST = 64 * 1024
#: the frames of one header block: the largest block taken, in frames of the smallest size (16 KiB), doubled; an
#: empty CONTINUATION adds no bytes, so only a count ends a flood of them (CVE-2024-27316's class)
MAX_HEADER_FRAMES = 2 * (2 * MAX_HEADER_LIST // f.DEFAULT_FRAME_SIZE)
#: the server's SETTINGS, and its WINDOW_UPDATE making the connection's window ``CONNECTION_WINDOW``
ANNOUNCED = f.settings(
    {
        f.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        f.SETTINGS_INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
        f.SETTINGS_MAX_FRAME_SIZE: MAX_FRAME_IN,
        f.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
    }
) + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW)
