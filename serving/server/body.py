"""Reading a request body: at most ``max_bytes`` (else 413), all of it within ``timeout_s`` of
the first read however it trickles in (else 408, and the connection is closed).

MLflow sets neither limit: it reads any size, and a client that sends less than its
``Content-Length`` holds a connection for as long as it likes.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

from serving.server.replies import Reply, error_reply

_CONNECTION_CLOSE = ((b"connection", b"close"),)


async def read_body(
    receive, content_length: bytes | None, max_bytes: int, timeout_s: float
) -> bytes | Reply:
    """The whole body of a request (ASGI ``receive``), or the error reply to send instead."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            return error_reply(400, "BAD_REQUEST", "Invalid Content-Length header.")
        if declared > max_bytes:
            return too_large(max_bytes)
    # The body's first message. When it is there already (the common case: the whole body
    # came with the headers), receive() answers without suspending and no timer is set; when
    # it would wait, it waits under the body deadline.
    waiter = receive().__await__()
    deadline = None
    try:
        waiting_on = waiter.send(None)
    except StopIteration as done:
        message = done.value
    else:
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                message = await _finish_await(waiter, waiting_on)
        except TimeoutError:
            return _body_timeout(timeout_s)
    body = message.get("body", b"")
    if message.get("more_body", False):
        return await _read_more(receive, body, deadline, max_bytes, timeout_s)
    if len(body) > max_bytes:
        return too_large(max_bytes)
    return body


@types.coroutine
def _finish_await(waiter, waiting_on):
    """The rest of an ``await`` begun by hand.

    ``waiter`` is an awaitable's ``__await__()`` iterator, stepped once with ``send(None)``,
    which yielded ``waiting_on`` (the future it waits for). Stepping it by hand first tells
    whether it completes without suspending, so that a timer is only set when it does not
    (``asyncio.timeout`` costs ~10 us, more than the rest of a small request's reading). This
    generator then does what ``await`` would have done from there, cancellation included.
    """
    while True:
        try:
            step, value = waiter.send, (yield waiting_on)
        except BaseException as exc:  # CancelledError (the deadline): waiter cleans up, re-raises
            step, value = waiter.throw, exc
        try:
            waiting_on = step(value)
        except StopIteration as done:
            return done.value


async def _read_more(
    receive, first: bytes, deadline: float | None, max_bytes: int, timeout_s: float
) -> bytes | Reply:
    """The rest of a body that came in several messages, all of it by ``deadline``
    (loop time; None: ``timeout_s`` from now)."""
    if deadline is None:
        deadline = asyncio.get_running_loop().time() + timeout_s
    chunks = [first]
    size = len(first)
    message: dict[str, Any] = {"more_body": True}
    try:
        async with asyncio.timeout_at(deadline):
            while message.get("more_body", False):
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    return too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        return _body_timeout(timeout_s)
    return b"".join(chunks)


def _body_timeout(timeout_s: float) -> Reply:
    why = f"The request body did not arrive within {timeout_s:g} s (send the whole body promptly, "
    reply = error_reply(408, "BAD_REQUEST", why + "and no less than its Content-Length).")
    reply.headers = _CONNECTION_CLOSE  # what is left of the body never gets read
    return reply


def too_large(max_bytes: int) -> Reply:
    why = f"The request body is larger than {max_bytes} bytes: send fewer rows per request."
    return error_reply(413, "BAD_REQUEST", why)
