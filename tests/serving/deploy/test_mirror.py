"""Which mirrored requests are merged, and what a merged one looks like on the wire (the proxy
end to end: tests/integration/test_local_proxy.py)."""

from __future__ import annotations

import json

import httptools
import pytest

from serving.deploy.mirror import MAX_LIVE_ANSWER_BYTES, MIRROR_BATCH_ROWS, _Batch, _table


def table(rows, columns=("a", "b"), **extra) -> bytes:
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": rows, **extra}})


def test_a_table_with_one_live_prediction_per_row_can_be_merged():
    assert _table(table([[1, 2], [3, 4]]).encode(), b'{"predictions": [0.5, 0.7]}') == (
        ("a", "b"),
        [[1, 2], [3, 4]],
        [0.5, 0.7],
    )


@pytest.mark.parametrize(
    ("body", "live"),
    [
        (table([[1, 2]], index=[7]), '{"predictions": [1]}'),  # an index: not just rows
        (table([[1, 2], [3, 4]]), '{"predictions": [1]}'),  # a prediction short
        (table([[1, 2]]), '{"predictions": [1], "other": 2}'),
        (table([]), '{"predictions": []}'),
        (table([[1, 2]], columns=(1, 2)), '{"predictions": [1]}'),
        (
            '{"dataframe_split": {"columns": ["a"], "data": [[1]]}, "params": {}}',
            '{"predictions": [1]}',
        ),
        ('{"dataframe_records": [{"a": 1}]}', '{"predictions": [1]}'),
        ('{"instances": [[1, 2]]}', '{"predictions": [1]}'),
        (table([[1, 2]]), '{"upstream": "blue"}'),
        ('{"dataframe_split": {"columns": ["a"], "data": [[1]]', '{"predictions": [1]}'),
    ],
)
def test_anything_else_is_sent_as_it_came(body, live):
    assert _table(body.encode(), live.encode()) is None


def parse(raw: bytes) -> tuple[dict[str, str], bytes]:
    """The headers and body of one HTTP request, read by the parser the model server uses."""
    got: dict = {"headers": {}, "body": b"", "complete": False}

    class Callbacks:
        def on_header(self, name, value):
            got["headers"][name.decode().lower()] = value.decode()

        def on_body(self, body):
            got["body"] += body

        def on_message_complete(self):
            got["complete"] = True

    httptools.HttpRequestParser(Callbacks()).feed_data(raw)
    assert got["complete"], "not one whole request"
    return got["headers"], got["body"]


def test_a_merged_request_carries_every_row_beside_its_live_prediction():
    batch = _Batch(("a", "b"), b"POST /invocations HTTP/1.1\r\n...")
    assert batch.fits(("a", "b"), MIRROR_BATCH_ROWS, MAX_LIVE_ANSWER_BYTES)
    assert not batch.fits(("a", "c"), 1, 10)
    assert not batch.fits(("a", "b"), MIRROR_BATCH_ROWS + 1, 10)
    assert not batch.fits(("a", "b"), 1, MAX_LIVE_ANSWER_BYTES + 1)
    batch.add([[1, 2]], [0.25], b'{"predictions": [0.25]}')
    batch.add([[3, 4.5]], [-1.0], b'{"predictions": [-1.0]}')  # two requests: merged
    headers, body = parse(batch.raw())
    assert json.loads(body) == {
        "dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4.5]]}
    }
    assert json.loads(headers["x-live-answer"]) == {"predictions": [0.25, -1.0]}
    assert headers["content-type"] == "application/json"


def test_a_request_that_waited_alone_goes_as_it_came():
    raw = b"POST /invocations HTTP/1.1\r\ncontent-length: 2\r\nx-live-answer: [1]\r\n\r\n{}"
    batch = _Batch(("a",), raw)
    batch.add([[1]], [1], b"[1]")
    assert batch.raw() == raw
