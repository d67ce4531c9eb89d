"""The warm-up: one real prediction through every path before the server says it is ready
(the input example, or without one rows made from the signature)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.server.contract import is_numeric_column
from serving.server.protocol import (
    WARMUP_ATOL,
    answer_difference,
    fast_rows,
    format_predictions,
    tensor_rows,
)
from serving.server.pyfunc_batching import batching_problem, predicts_inline
from serving.server.reference import CONTENT_TYPE_JSON, reference_invocations
from serving.server.replies import RequestError

if TYPE_CHECKING:
    from serving.server.loader import LoadedModel

log = logging.getLogger("serving.server")


def warm_up(model: LoadedModel, *, pyfunc_batching: bool) -> tuple | None:
    """A real prediction through both paths; the fast path must agree with the pyfunc
    (same layout, numbers within ``WARMUP_ATOL``), else the pyfunc serves; without it, whether
    the pyfunc may be micro-batched (:func:`batching_problem`). Sets ``model``'s notes, ends
    with one log line saying which path serves the model and why (``serving path: ...``, also
    in ``GET /v1/model``), and returns the request key of pyfunc micro-batching (None: not
    batched)."""
    example, source = model.serving_input_example(), "the input example"
    if example is None:
        example, source = synthetic_example(model), "rows generated from the signature"
    if example is None:
        log.warning("no input example and no numeric signature: warm-up skipped")
        if model.fast is not None:
            model.fast = None
            model.fast_path_note = "disabled: nothing to check it against at load"
        model.batching_note = "no input example to check it on"
        log_serving_path(model)
        return None
    finite = model.fast is not None
    reference = reference_invocations(model, example.encode(), CONTENT_TYPE_JSON, finite=finite)
    if reference.status != 200:
        why = f"({reference.status}): {reference.body[:500]!r}"
        raise RuntimeError(f"the warm-up prediction on the model's input example failed {why}")
    if model.fast is not None:
        if problem := fast_path_problem(model.fast, example, reference.body):
            model.fast = None
            model.fast_path_note = f"disabled at warm-up ({source}): {problem}"
        else:
            model.fast_path_note += f"; agrees with pyfunc.predict on {source}"
    batch_key = None
    if model.fast is not None:
        model.batching_note = "the fast path batches"
    elif not pyfunc_batching:
        model.batching_note = "disabled"
    else:
        batch_key, model.batching_note = batching_problem(model, example)
        model.batched_pyfunc = batch_key is not None
        if model.batched_pyfunc:
            where = "on the event loop" if predicts_inline(model) else "in the model thread"
            ms = model.predict_seconds * 1000
            model.batching_note += f", {where} (predict on the example: {ms:.1f} ms)"
    log_serving_path(model)
    return batch_key


def log_serving_path(model: LoadedModel) -> None:
    if model.fast is not None:
        log.info("serving path: keras-fast-path (%s)", model.fast_path_note)
    else:
        log.info("serving path: %s (fast path: %s; batching: %s)", model.serving_path,
                 model.fast_path_note, model.batching_note)  # fmt: skip


def synthetic_example(model: LoadedModel) -> str | None:
    """A request for a model without an input example: one all-zeros row for numeric
    columns; for one ``[-1, n]`` tensor, a few seeded random rows (float32 values)."""
    schema = model.input_schema
    if schema is None:
        return None
    if schema.is_tensor_spec():
        specs = schema.inputs
        shape = tuple(specs[0].shape) if len(specs) == 1 else ()
        if len(shape) != 2 or shape[0] != -1 or specs[0].name is not None:
            return None
        rows = np.random.default_rng(0).normal(size=(8, shape[1])).astype(np.float32)
        return json.dumps({"inputs": rows.tolist()})
    if not schema.has_input_names():
        return None
    specs = schema.inputs
    if not all(is_numeric_column(s) for s in specs):
        return None
    names = schema.input_names()
    return json.dumps({"dataframe_split": {"columns": names, "data": [[0] * len(names)]}})


def fast_path_problem(fast: Any, example: str, reference_body: bytes) -> str | None:
    """Why the fast path's answer to ``example`` is not the pyfunc's (None: it is)."""
    payload = json.loads(example)
    try:
        if fast.tensor_input:
            rows = tensor_rows(payload, len(fast.feature_columns), True)
        else:
            rows = fast_rows(payload, fast.feature_columns, True)
    except RequestError as exc:
        return f"the input example is rejected by the fast path: {exc.message}"
    if rows is None:
        return "the input example is not in a fast-path shape"
    got = json.loads(format_predictions(fast.predict(rows), fast.output_layout, fast.output_name))
    expected = json.loads(reference_body)
    diff = answer_difference(got, expected)
    if diff is None:
        fast_answer, pyfunc_answer = json.dumps(got)[:120], json.dumps(expected)[:120]
        return f"the answers differ in layout (fast path {fast_answer}, pyfunc {pyfunc_answer})"
    if not diff <= WARMUP_ATOL:
        return f"fast path and pyfunc disagree (max diff {diff:.3g} > {WARMUP_ATOL:g})"
    return None
