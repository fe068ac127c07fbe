"""The native gRPC front: HTTP/2 read on the event loop's own connections (an ``asyncio.Protocol``, as uvicorn
is for HTTP/1.1), serving the same handlers as grpc.aio's server (``decoding.Methods``) through the same
admission point; no poller thread, no completion queue, one coroutine per call (a unary call's without a Task).

``frames``: HTTP/2 frames and HPACK; ``bounds``: what a client may make a connection hold; ``requests``: what a
call's headers ask; ``calls``: a call's context and coroutine (a unary call's run without a Task:
``dhow.protocols.runner``); ``connection``: one connection's protocol; ``server``: the port and its stop.
"""
