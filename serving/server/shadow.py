"""A shadow's paired differences: how far its answer is from the live version's, row by row.

During a shadow step the front proxy sends a sampled share of the live requests to the
candidate again, after the caller has the live answer, and puts that answer in the request's
``X-Live-Answer`` header (``serving.server.contract.LIVE_ANSWER_HEADER``). The request path
only keeps the two answer bodies (:class:`~serving.server.records.Recorder`); at each flush
they are decoded here and every row's ``|candidate - live|`` lands in the
``model_server_shadow_abs_diff`` histogram. A pair whose answers do not line up (another
number of values, no numbers) counts in ``model_server_shadow_unpaired_total`` instead.

The local front proxy merges mirrored requests that wait (``serving.deploy.mirror``); a merged
one carries their count (``MIRRORED_REQUESTS_HEADER``) and is recorded as that many requests
(:func:`mirror_of`), so the rollout judge's request count and 5xx share are per mirrored
request, merged or not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from serving.server.contract import (
    LIVE_ANSWER_HEADER,
    MAX_MIRRORED_REQUESTS,
    MIRRORED_REQUESTS_HEADER,
)
from serving.server.jsoncodec import DecodeError, loads

_LIVE_ANSWER = LIVE_ANSWER_HEADER.lower().encode()
_MIRRORED_REQUESTS = MIRRORED_REQUESTS_HEADER.lower().encode()

# |candidate - live| in the model's own units: from float noise to a wholly other answer.
SHADOW_DIFF_BUCKETS = (
    1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 1000.0,
)  # fmt: skip


def mirror_of(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, int]:
    """A request's live answer (None: not a mirrored request) and how many mirrored requests
    it carries: more than one only beside a live answer, and only from 1 to
    ``MAX_MIRRORED_REQUESTS`` (anything else counts as one)."""
    live, count = None, b""
    for name, value in headers:
        if name == _LIVE_ANSWER:
            live = value
        elif name == _MIRRORED_REQUESTS:
            count = value
    if live is None or not count:
        return live, 1
    n = int(count) if count.isdigit() and len(count) <= 6 else 0
    return live, n if 1 <= n <= MAX_MIRRORED_REQUESTS else 1


def numbers(answer: Any) -> list[float]:
    """Every number of a scoring answer, in order (``{"predictions": [{"prediction": x}]}``,
    ``[[x]]``, ``[x]``, several outputs per row)."""
    if isinstance(answer, dict):
        answer = answer.get("predictions", answer)
        if isinstance(answer, dict):
            return [v for value in answer.values() for v in numbers(value)]
    if isinstance(answer, list):
        return [v for value in answer for v in numbers(value)]
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return [float(answer)]
    return []


def paired_differences(pairs: Iterable[tuple[bytes, bytes]]) -> tuple[np.ndarray, int]:
    """``|own - live|`` of every row of every pair (own answer, live answer), and how many
    pairs did not line up."""
    diffs: list[float] = []
    unpaired = 0
    for own, live in pairs:
        try:
            mine, theirs = numbers(loads(own)), numbers(loads(live))
        except DecodeError:
            unpaired += 1
            continue
        if not mine or len(mine) != len(theirs):
            unpaired += 1
            continue
        diffs.extend(abs(a - b) for a, b in zip(mine, theirs, strict=True))
    return np.asarray(diffs, dtype=np.float64), unpaired
