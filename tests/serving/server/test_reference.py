"""The reference path (``serving.server.reference``): what it records for the histograms, and
what it says where it cannot read a body."""

from __future__ import annotations

import json

import numpy as np

from tests.serving.server.asgi import FEATURES, make_app, post, run


def test_the_reference_path_records_the_columns_it_parsed_and_one_prediction_per_row():
    import pandas as pd

    from serving.server.reference import observed

    frame = pd.DataFrame({"a": [1.0, None], "c": ["x", "y"], "b": [3, 4]})
    matrix, predictions = observed(frame, pd.DataFrame({"p": [0.5, 1.5]}), ("a", "b", "c", "d"))
    # a: a missing value; c: not numbers; d: absent. NaN is not counted.
    assert np.array_equal(
        matrix, [[1.0, 3.0, np.nan, np.nan], [np.nan, 4.0, np.nan, np.nan]], equal_nan=True
    )
    assert predictions.tolist() == [0.5, 1.5]
    _, predictions = observed(frame, pd.DataFrame({"p": [1, 2], "q": [3, 4]}), ("a",))
    assert predictions is None  # not one number per row
    _, predictions = observed(frame, np.array([[1.0], [2.0]]), ("a",))
    assert predictions.tolist() == [1.0, 2.0]
    assert observed({"tensor": [1, 2]}, ["text", "more"], ("a",)) is None


def test_a_parquet_body_where_no_parquet_reader_is_installed_is_415_and_says_what_to_send(
    monkeypatch, request
):
    """The slim serving image has no pyarrow: a Parquet request is not the client's bad data."""
    import io
    import sys

    import pandas as pd

    from serving.server import reference

    body = io.BytesIO()
    pd.DataFrame({name: [1.0] for name in FEATURES}).to_parquet(body)
    for module in ("pyarrow", "pyarrow.parquet", "fastparquet"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    reference.can_read_parquet.cache_clear()  # ask again, here and after the test
    request.addfinalizer(reference.can_read_parquet.cache_clear)

    async def scenario():
        return await post(
            make_app(fast=False),
            [(0, body.getvalue())],
            content_type=b"application/vnd.apache.parquet",
        )

    status, _, answer = run(scenario())
    assert status == 415
    text = answer if isinstance(answer, str) else json.dumps(answer)
    assert "Parquet" in text and "pyarrow" in text and "JSON or CSV" in text
