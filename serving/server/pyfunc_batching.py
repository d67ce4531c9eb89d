"""Micro-batching for any pyfunc served without the fast path (a scikit-learn model, say),
where the warm-up shows it is safe (:func:`batching_problem`)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.server.batching import MicroBatcher
from serving.server.compat import parse_json_data
from serving.server.contract import is_numeric_column
from serving.server.protocol import WARMUP_ATOL, answer_difference
from serving.server.reference import NOT_SHARED

if TYPE_CHECKING:
    from serving.server.loader import LoadedModel

# A pyfunc whose predict on the input example takes at most this long runs on the event loop
# for small batches (see PyfuncBatching).
INLINE_PREDICT_S = 0.005


class PyfuncBatching:
    """Concurrent requests to a pyfunc served without the fast path share one ``predict``.

    Each request is parsed by MLflow as before (in a worker thread); a parsed DataFrame with
    exactly the columns and dtypes of the parsed input example (and the default index) then
    goes to a :class:`MicroBatcher` that concatenates the frames of the requests waiting
    together, calls ``pyfunc.predict`` once (schema enforcement included) in its model thread
    and cuts each request's rows out of the result (written by MLflow's
    ``predictions_to_json``). If that call fails, each request runs on its own (only the bad one
    fails). Anything else (other columns or dtypes, params, non-frame input) is predicted on its
    own, as before.

    Used only where :func:`batching_problem` found at load that the model answers one row per
    input row and that a shared call answers each part as a call of its own would.
    """

    def __init__(
        self, model: LoadedModel, key: tuple, loop: asyncio.AbstractEventLoop, *, inline=False,
        **batcher: Any,
    ) -> None:  # fmt: skip
        self.key = key
        self.loop = loop
        self.timeout_s = batcher.pop("timeout_s", 60.0)
        # Numeric input columns: small JSON requests skip MLflow's per-request parsing
        # (column_rows); the rows of a shared call become one frame the way MLflow parses a
        # dataframe_split (dataframe_from_parsed_json: the frame, then the schema's types).
        self.columns: tuple[str, ...] | None = None
        self._schema = schema = model.input_schema
        names, _ = key
        named = schema is not None and not schema.is_tensor_spec() and schema.has_input_names()
        if named and tuple(schema.input_names()) == names:
            self.columns = names if all(map(is_numeric_column, schema.inputs)) else None
        # A model that answers the example within INLINE_PREDICT_S runs on the event loop for
        # small batches (no hand-off to the model thread and back); a slower one never does.
        mode = "auto" if inline else "thread"
        self.batcher = MicroBatcher(model.pyfunc.predict, mode=mode, merge=self._merge,
                                    take=_take_rows, count=_count_rows, **batcher)  # fmt: skip

    def _frame(self, rows: list) -> Any:
        from mlflow.utils.proto_json_utils import dataframe_from_parsed_json

        split = {"columns": list(self.key[0]), "data": rows}
        return dataframe_from_parsed_json(split, "split", self._schema)

    def _merge(self, parts: list) -> Any:
        import pandas as pd

        if len(parts) == 1 and type(parts[0]) is not list:
            return parts[0]
        if all(type(p) is list for p in parts):
            return self._frame([row for p in parts for row in p])
        frames = [self._frame(p) if type(p) is list else p for p in parts]
        return pd.concat(frames, ignore_index=True)

    def __call__(self, data: Any) -> Any:
        """In a worker thread: ``data``'s predictions from a shared call, or NOT_SHARED."""
        if _frame_key(data) != self.key:
            return NOT_SHARED
        done = asyncio.run_coroutine_threadsafe(self.batcher.predict(data), self.loop)
        return done.result(timeout=self.timeout_s)


def predictions_json(raw: Any) -> bytes:
    """``raw`` as MLflow's scoring server writes predictions."""
    from mlflow.pyfunc import scoring_server as ss

    out = io.StringIO()
    ss.predictions_to_json(raw, out)
    return out.getvalue().encode()


def predicts_inline(model: Any) -> bool:
    """Whether ``model``'s predict was fast enough at warm-up to run on the event loop."""
    seconds = getattr(model, "predict_seconds", None)
    return seconds is not None and seconds <= INLINE_PREDICT_S


def _frame_key(data: Any) -> tuple | None:
    import pandas as pd

    if type(data) is not pd.DataFrame or not len(data):
        return None
    index = data.index
    if type(index) is not pd.RangeIndex or index.start != 0 or index.step != 1:
        return None
    return tuple(data.columns), tuple(str(t) for t in data.dtypes)


def _take_rows(outputs: Any, start: int, stop: int) -> Any:
    import pandas as pd

    if isinstance(outputs, pd.DataFrame | pd.Series):
        return outputs.iloc[start:stop]
    if isinstance(outputs, np.ndarray | list):
        return outputs[start:stop]
    raise TypeError(f"cannot split a {type(outputs).__name__} by rows")


def _count_rows(outputs: Any) -> int:
    import pandas as pd

    if isinstance(outputs, pd.DataFrame | pd.Series | np.ndarray | list):
        return len(outputs)
    raise TypeError(f"a {type(outputs).__name__} has no rows")


def batching_problem(model: LoadedModel, example: str) -> tuple[tuple | None, str]:
    """Whether concurrent requests to ``model``'s pyfunc may share a call, checked on the
    parsed ``example``: returns (the request key, note) or (None, why not)."""
    import pandas as pd

    try:
        data, _, unified_llm = parse_json_data(example, model.metadata, model.input_schema)
    except Exception as exc:
        return None, f"the input example does not parse: {exc}"
    key = _frame_key(data)
    if unified_llm or key is None:
        return None, f"the model takes a {type(data).__name__}, not rows of a DataFrame"
    predict = model.pyfunc.predict
    first = data.reset_index(drop=True)
    try:
        predict(first)  # warm
        started = time.perf_counter()
        predict(first)
        model.predict_seconds = time.perf_counter() - started
    except Exception as exc:
        return None, f"predict on the input example failed: {type(exc).__name__}: {exc}"
    second = first.iloc[::-1].reset_index(drop=True)
    if len(first) == 1:  # two different rows, where the example allows
        second = first.copy()
    try:
        alone = [predict(first), predict(second)]
        together = predict(pd.concat([first, second], ignore_index=True))
        n = len(first)
        if _count_rows(together) != 2 * n or any(_count_rows(a) != n for a in alone):
            return None, "the model does not answer one row per input row"
        parts = [_take_rows(together, 0, n), _take_rows(together, n, 2 * n)]
    except Exception as exc:
        return None, f"a shared call on the input example failed: {type(exc).__name__}: {exc}"
    for part, own in zip(parts, alone, strict=True):
        diff = answer_difference(_as_json(part), _as_json(own))
        if diff is None:
            return None, "a shared call's answer is laid out differently"
        if not diff <= WARMUP_ATOL:
            return None, f"a shared call answers differently (max diff {diff:.3g})"
    return key, f"rows of {len(key[0])} columns share a predict call"


def _as_json(raw: Any) -> Any:
    return json.loads(predictions_json(raw))
