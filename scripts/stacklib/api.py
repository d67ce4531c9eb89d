"""JSON calls to the stack's HTTP APIs, repeated on a 5xx when they are safe to repeat."""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed

# A repeatable call that got a 5xx is sent this many times in all, this far apart: Airflow on
# SQLite answers 500 while its database is locked, which happens as its own processes start.
ATTEMPTS = 5
RETRY_WAIT_S = 2.0


def _server_error(exc: BaseException) -> bool:
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500


def json_call(client: httpx.Client, method: str, path: str, *, repeatable: bool, **kwargs: Any):
    """The JSON answer of one call; a ``repeatable`` one (safe to send twice) is sent again on a
    5xx, a call that is not is sent once."""
    return Retrying(
        stop=stop_after_attempt(ATTEMPTS if repeatable else 1),
        wait=wait_fixed(RETRY_WAIT_S),
        retry=retry_if_exception(_server_error),
        reraise=True,
    )(lambda: client.request(method, path, **kwargs).raise_for_status().json())
