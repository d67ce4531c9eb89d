"""Protocol parity for every kind of model the server has a path for, on each path.

Four models share one throwaway SQLite registry: a small Keras network (trained for a few
epochs) logged with ``mlflow.tensorflow.log_model`` and with ``mlflow.keras.log_model`` (both
require a tensor signature, ``float32 [-1, 4]``), a scikit-learn regression logged with
``mlflow.sklearn.log_model``, and the project's own pyfunc (``ml.train``). For each, stock
``mlflow models serve`` and this server run as real processes, this server once on its
default path (the Keras fast path for the networks, micro-batched ``pyfunc.predict`` for
scikit-learn) and once on the fallback (``--no-fast-path``, and ``--no-pyfunc-batching`` for
scikit-learn); the project's pyfunc on its default path (the LiteRT slim path, where the
runtime is installed) is test_server_protocol's, here on the TensorFlow fast path
(``--no-slim``) and the plain pyfunc. Every request
of test_server_protocol goes to both servers: the same status, the same ``error_code``, and
for a 200 the same layout and the same numbers (atol 1e-5). Where this server deliberately
differs (non-finite values: a 400), the request is left out here; test_server_protocol
covers that.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import numpy as np
import pytest

from tests.conftest import free_port
from tests.integration.test_server_protocol import (
    ATOL,
    BAD,
    FEATURES,
    GOOD,
    TARGET,
    ServerProcess,
    child_env,
    numbers,
    our_server_cmd,
    sqlite_registry,
    stock_server_cmd,
    synthetic_frame,
    train_and_register,
)

pytestmark = pytest.mark.integration

# Per model: this server's paths, as (name, extra arguments, what /v1/model must say).
PATHS = {
    "tensorflow": [("fast", [], "keras-fast-path"), ("fallback", ["--no-fast-path"], "pyfunc")],
    "keras": [("fast", [], "keras-fast-path"), ("fallback", ["--no-fast-path"], "pyfunc")],
    "sklearn": [
        ("batched", [], "pyfunc-batched"),
        ("fallback", ["--no-pyfunc-batching"], "pyfunc"),
    ],
    # The project's pyfunc carries a LiteRT artifact: its default (slim) path is
    # test_server_protocol's; here its TensorFlow fast path and the plain pyfunc.
    "pyfunc": [
        ("tensorflow", ["--no-slim"], "keras-fast-path"),
        ("fallback", ["--no-fast-path"], "pyfunc-batched"),
    ],
}
# Paths that must not be served by the LiteRT runtime.
NOT_SLIM = {("pyfunc", "tensorflow"), ("pyfunc", "fallback")}
# Requests for a tensor model: rows by position.
ROWS = [[0.5, -1.25, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0], [-0.75, 0.125, 10.5, -3.0]]
TENSOR = [
    ("inputs-rows", {"inputs": ROWS}),
    ("instances-rows", {"instances": ROWS}),
    ("inputs-one-row", {"inputs": ROWS[:1]}),
    ("inputs-flat", {"inputs": ROWS[0]}),
    ("inputs-short-rows", {"inputs": [r[:3] for r in ROWS]}),
    ("inputs-strings", {"inputs": [["0.5", "1", "2", "3"]]}),
    ("inputs-booleans", {"inputs": [[True, False, 1.5, 2.0]]}),
    ("inputs-dict", {"inputs": {"x": ROWS}}),
    ("inputs-empty", {"inputs": []}),
    ("inputs-params", {"inputs": ROWS, "params": {"anything": 1}}),
    ("split-no-columns", {"dataframe_split": {"data": ROWS}}),
    (
        "inputs-many-rows",
        {"inputs": synthetic_frame(300, seed=5)[FEATURES].round(6).to_numpy().tolist()},
    ),
]
REQUESTS = [(name, data, ctype) for name, data, ctype in GOOD + BAD] + [
    (name, json.dumps(payload).encode(), "application/json") for name, payload in TENSOR
]


def _log_models(root) -> dict[str, str]:
    """Train and register the four models; returns kind -> models:/ URI."""
    import keras
    import mlflow
    import mlflow.keras
    import mlflow.sklearn
    import mlflow.tensorflow
    from mlflow.models import infer_signature
    from sklearn.linear_model import Ridge

    frame = synthetic_frame(240, seed=0)
    x32 = frame[FEATURES].to_numpy("float32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((len(FEATURES),))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    network = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    network.compile(optimizer="adam", loss="mse")
    network.fit(x32, frame[TARGET].to_numpy("float32"), epochs=5, batch_size=32, verbose=0)
    tensor_signature = infer_signature(x32[:5], np.asarray(network(x32[:5])))
    regression = Ridge().fit(frame[FEATURES], frame[TARGET])

    uris = {"pyfunc": train_and_register(root, "parity-pyfunc").model_uri}
    mlflow.set_experiment("parity-flavors")
    with mlflow.start_run():
        logged = {
            "tensorflow": mlflow.tensorflow.log_model(
                network,
                name="tf",
                signature=tensor_signature,
                input_example=x32[:3],
                # Declared: inferring them loads the model in a child interpreter (seconds).
                pip_requirements=["mlflow", "tensorflow-cpu"],
            ),
            # MLflow 3.17's keras.log_model fails to write an input example (it saves it
            # before creating the model folder): the server generates rows from the signature.
            "keras": mlflow.keras.log_model(
                network,
                name="keras",
                signature=tensor_signature,
                pip_requirements=["mlflow", "keras", "tensorflow-cpu"],
            ),
            "sklearn": mlflow.sklearn.log_model(
                regression,
                name="sklearn",
                signature=infer_signature(frame[FEATURES], regression.predict(frame[FEATURES])),
                input_example=frame[FEATURES].head(3),
                pip_requirements=["mlflow", "scikit-learn"],
            ),
        }
    for kind, info in logged.items():
        version = mlflow.register_model(info.model_uri, f"parity-{kind}").version
        uris[kind] = f"models:/parity-{kind}/{version}"
    return uris


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-flavors")
    with sqlite_registry(root) as uri:
        yield uri, root, _log_models(root)


@pytest.fixture(scope="module", params=list(PATHS))
def servers(request, registry):
    """Stock and this server on each of its paths, for one kind of model."""
    tracking_uri, root, uris = registry
    kind, uri = request.param, uris[request.param]
    env = child_env(tracking_uri)
    started: list[ServerProcess] = []
    try:
        port = free_port()
        stock = ServerProcess.start(f"stock-{kind}", stock_server_cmd(uri, port), port, env, root)
        started.append(stock)
        ours = {}
        for name, extra, expected in PATHS[kind]:
            port = free_port()
            cmd = our_server_cmd(uri, port, *extra)
            ours[name] = (
                ServerProcess.start(f"ours-{kind}-{name}", cmd, port, env, root),
                expected,
            )
            started.append(ours[name][0])
        for server in started:
            server.wait_ready()
        with contextlib.ExitStack() as stack:
            clients = {
                name: (stack.enter_context(httpx.Client(base_url=s.url, timeout=60)), expected)
                for name, (s, expected) in ours.items()
            }
            s = stack.enter_context(httpx.Client(base_url=stock.url, timeout=60))
            yield kind, s, clients
    finally:
        for server in started:
            server.stop()


def _post(client: httpx.Client, data: bytes, content_type: str) -> httpx.Response:
    return client.post("/invocations", content=data, headers={"Content-Type": content_type})


def _layout(obj):
    if isinstance(obj, dict):
        return {k: _layout(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_layout(v) for v in obj]
    return 0 if isinstance(obj, int | float) and not isinstance(obj, bool) else obj


def test_each_path_is_the_one_expected_and_says_why(servers):
    kind, _, ours = servers
    for name, (client, expected) in ours.items():
        info = client.get("/v1/model").json()
        assert info["serving_path"] == expected, (kind, name, info)
        assert info["fast_path_note"] and info["pyfunc_batching_note"]
        if (kind, name) in NOT_SLIM:
            assert "litert" not in info["fast_path_note"].lower(), (kind, name, info)
        assert info["flavor"] == {"pyfunc": "pyfunc:keras_pyfunc.py"}.get(kind, kind)


@pytest.mark.parametrize(
    ("data", "content_type"), [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS]
)
def test_every_request_gets_stocks_status_and_answer_on_every_path(servers, data, content_type):
    kind, stock, ours = servers
    s = _post(stock, data, content_type)
    for name, (client, _) in ours.items():
        o = _post(client, data, content_type)
        where = (kind, name, s.text[:300], o.text[:300])
        assert o.status_code == s.status_code, where
        if s.status_code == 200:
            expected, got = s.json(), o.json()
            assert _layout(got) == _layout(expected), where
            assert np.allclose(numbers(got), numbers(expected), rtol=0, atol=ATOL), where
        elif s.headers["content-type"].startswith("application/json"):
            assert o.json()["error_code"] == s.json()["error_code"], where
