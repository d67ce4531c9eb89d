"""A JSON body decoded once (``serving.server.jsoncodec``): what the server's decoder made of a
body is handed to MLflow's parsing only where ``json.loads``, MLflow's decoder, reads the body as
the same value (same types, same numbers)."""

from __future__ import annotations

import json
import math
import random

import pytest

from serving.server.jsoncodec import UNDECODED, DecodeError, as_mlflow_reads, loads


def _same(a, b) -> bool:
    """Equal, with the same types all the way down (1 and 1.0 differ; -0.0 and 0.0 too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b))
    return a == b


def _handed_over(body: bytes):
    try:
        payload = loads(body)
    except DecodeError:
        payload = UNDECODED
    return as_mlflow_reads(payload, body)


def _value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, 1, -1]) * rng.randrange(10 ** rng.randrange(1, 26))  # to ~2**83
    if kind == 1:
        return rng.uniform(-1, 1) * 10.0 ** rng.randrange(-320, 309)
    if kind == 2:
        return rng.choice([True, False, None, -0.0, 0.1, 1e-320, 5e-324])
    if kind == 3:
        return "".join(rng.choice('aé€\U0001f600\\"\n\t/\x7f') for _ in range(rng.randrange(6)))
    if kind in (4, 5):
        return rng.random()
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randrange(4))}


def test_a_body_is_handed_over_only_as_json_reads_it():
    rng = random.Random(0)
    handed = again = 0
    for _ in range(3000):
        body = json.dumps({"dataframe_split": _value(rng)}, ensure_ascii=rng.random() < 0.5)
        body = body.encode()
        payload = _handed_over(body)
        if payload is UNDECODED:
            again += 1
        else:
            handed += 1
            assert _same(payload, json.loads(body)), body
    assert handed > 2000 and again > 100  # both cases were met, most bodies handed over


@pytest.mark.parametrize(
    "body",
    [
        b"[18446744073709551616]",  # 2**64: orjson reads a float
        b"[18446744073709551615]",  # 19 digits or more: decoded again, even where both agree
        b"[-9223372036854775809]",  # below -2**63: the same
        b"[1e400]",  # json reads inf: orjson refuses
        b'["\\ud800"]',  # a lone surrogate: json keeps it, orjson refuses
        b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte order mark: json reads it, orjson refuses
        b"[NaN]",  # refused by both (MLflow's path says why)
        b"[1,]",
    ],
)
def test_what_json_reads_otherwise_is_not_handed_over(body):
    assert _handed_over(body) is UNDECODED


@pytest.mark.parametrize(
    "body",
    [
        b"[184467440737095516, -922337203685477580]",  # 18 digits
        b'{"a": 1, "a": 2}',
        b"[1e-400, -0.0, 1E2, 4.9e-324]",
        b'["\\ud83d\\ude00", "\\u0000"]',
        b"null",
    ],
)
def test_what_both_read_alike_is_handed_over(body):
    payload = _handed_over(body)
    assert payload is not UNDECODED
    assert _same(payload, json.loads(body))
