"""The ASGI app driven directly, with a stand-in model: no server, no MLflow model files.

The stand-in has the three columns :data:`FEATURES` (all ``double``); its fast path (optional)
and its pyfunc both predict the row sum.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np

FEATURES = ("a", "b", "c")
GOOD_SPLIT = json.dumps({"dataframe_split": {"columns": list(FEATURES), "data": [[1, 2, 3]]}})


def split(columns=FEATURES, data=((1.0, 2.0, 3.0),), **extra) -> dict:
    """A ``dataframe_split`` request."""
    return {"dataframe_split": {"columns": list(columns), "data": [list(r) for r in data], **extra}}


class FakeFast:
    """Stands in for the Keras fast path: the prediction is the row sum."""

    feature_columns = list(FEATURES)
    output_name = "prediction"
    output_layout = "records"
    tensor_input = False

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, rows) -> np.ndarray:
        self.calls += 1
        return np.asarray(rows, dtype=np.float32).sum(axis=1)


class RefusingPyfunc:
    """The reference path's model where it must never run (strict mode answers first)."""

    def predict(self, data, params=None):
        raise AssertionError("the model ran on input that strict mode rejects")


class SummingPyfunc:
    """The reference path's model: the row sum, as a ``prediction`` column."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, data, params=None):
        import pandas as pd

        self.calls += 1
        return pd.DataFrame({"prediction": data[list(FEATURES)].sum(axis=1).astype(float)})


def fake_model(fast: bool = True, pyfunc=None, batched: bool = False):
    """A loaded model as the app sees it (``serving.server.loader.LoadedModel``'s interface);
    ``batched``: the warm-up found that its pyfunc may be micro-batched."""
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("double", name) for name in FEATURES])
    identity = SimpleNamespace(name="m", version="1", uri="models:/m/1")
    return SimpleNamespace(
        identity=identity,
        flavor="python_function",
        fast=FakeFast() if fast else None,
        fast_path_note="test",
        load_seconds=0.0,
        input_schema=schema,
        # what MLflow's parser asks of a model's metadata (no params, no type hints)
        metadata=SimpleNamespace(get_params_schema=lambda: None),
        has_params_schema=False,
        pyfunc=pyfunc if pyfunc is not None else RefusingPyfunc(),
        batched_pyfunc=batched,
        predict_seconds=None,
        describe=lambda: {"name": "m", "version": "1"},
    )


# The request key of micro-batching for the stand-in's frames (serving.server.pyfunc_batching).
BATCH_KEY = (FEATURES, ("float64",) * len(FEATURES))


def make_app(*, ready: bool = True, fast: bool = True, pyfunc=None, batched=False, **config):
    """The app serving the stand-in model: its fast path (``fast``), else its pyfunc,
    micro-batched where ``batched`` (call it on the running event loop then)."""
    from serving.server.app import ScoringApp
    from serving.server.config import ServerConfig

    app = ScoringApp(ServerConfig(model_uri="models:/m/1", access_log=False, **config))
    if ready:
        if batched:
            app._loop = asyncio.get_running_loop()
        model = fake_model(fast, pyfunc, batched)
        app._set_ready(model, None, BATCH_KEY if batched else None)
    return app


async def post(app, parts, *, content_type=b"application/json", complete=True, headers=()):
    """POST /invocations; ``parts`` are (delay_s, bytes) body messages. ``complete=False``:
    the client declared more than it sends, and the rest never comes. ``headers``: more
    (name, value) request headers, lower-case bytes. Returns (status, headers, decoded JSON
    body)."""
    declared = sum(len(chunk) for _, chunk in parts) + (0 if complete else 100)
    headers = [(b"content-length", b"%d" % declared), *headers]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": headers,
        "client": ("127.0.0.1", 1),
    }
    pending = list(parts)

    async def receive():
        if pending:
            delay, chunk = pending.pop(0)
            if delay:
                await asyncio.sleep(delay)
            return {
                "type": "http.request",
                "body": chunk,
                "more_body": bool(pending) or not complete,
            }
        await asyncio.Event().wait()  # the rest of the body never arrives

    sent = []

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    start, body = sent
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def run(coro):
    return asyncio.run(coro)
