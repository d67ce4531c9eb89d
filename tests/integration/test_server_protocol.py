"""Protocol parity: the same requests to stock `mlflow models serve` and to our server.

One Keras model is trained with ``ml.train.train_model`` and registered in a throwaway SQLite
registry; both servers serve that version as real processes on loopback ports. Every request
below goes to both, and the answers are compared: status codes, ``error_code`` values, and
predictions (atol 1e-5). Where this server is deliberately better (413 for oversized bodies,
400 for NaN/Infinity/null, 415 without a Content-Type), the test asserts ours and records what
stock does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "serving-parity"
FEATURES = ["x0", "x1", "x2", "x3"]
TARGET = "target"
ATOL = 1e-5
# A value that appears in the bad requests: stock echoes it back in errors, we must not.
SENTINEL = 987.654321
MAX_REQUEST_BYTES = 256 * 1024
START_TIMEOUT_S = 240.0


# -- shared helpers (also used by test_server_runtime) -------------------------------------------


def synthetic_frame(n_rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, len(FEATURES)))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + 10 + rng.normal(scale=0.3, size=n_rows)
    frame = pd.DataFrame(x, columns=FEATURES)
    frame[TARGET] = y
    return frame


@dataclass
class Registry:
    tracking_uri: str
    model_uri: str
    version: str
    root: Path


@contextlib.contextmanager
def sqlite_registry(root: Path):
    """MLflow tracking + registry in ``root`` (SQLite, local artifacts) for a test module."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


def train_and_register(root: Path, name: str) -> Registry:
    """The project's Keras pyfunc, trained small and registered; must run in sqlite_registry."""
    import mlflow

    from ml.settings import TrainingSettings
    from ml.train import train_model

    experiment = f"{name}-experiment"
    mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    result = train_model(
        synthetic_frame(240, seed=0),
        FEATURES,
        TARGET,
        TrainingSettings(epochs=3, hidden_units=[16, 8], batch_size=32),
        experiment_name=experiment,
    )
    version = str(mlflow.register_model(result.model_uri, name).version)
    return Registry(mlflow.get_tracking_uri(), f"models:/{name}/{version}", version, root)


def child_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    # `mlflow models serve` runs `uvicorn` from PATH: it must be this interpreter's.
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServerProcess:
    """A server started as its own process group on a loopback port."""

    name: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    out_path: Path | None = None
    startup_statuses: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls, name: str, cmd: list[str], port: int, env: dict[str, str], log_dir: Path
    ) -> ServerProcess:
        log_path = log_dir / f"{name}.err.log"
        out_path = log_dir / f"{name}.out.log"
        with open(log_path, "wb") as err, open(out_path, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(log_dir),
            )
        return cls(name, proc, port, log_path, out_path)

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll /ping until 200; every answered status is kept in ``startup_statuses``."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    status = client.get(f"{self.url}/ping").status_code
                    self.startup_statuses.append(status)
                    if status == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {timeout_s}s:\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def our_server_cmd(model_uri: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "serving.server",
        "--model-uri", model_uri, "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


def stock_server_cmd(model_uri: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
    ]  # fmt: skip


def numbers(obj) -> list[float]:
    """All numbers in a predictions payload, in order."""
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in numbers(value)]
    if isinstance(obj, list):
        return [v for value in obj for v in numbers(value)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-protocol")
    with sqlite_registry(root):
        yield train_and_register(root, MODEL_NAME)


@pytest.fixture(scope="module")
def servers(registry):
    env = child_env(registry.tracking_uri)
    stock_port, our_port = free_port(), free_port()
    while our_port == stock_port:
        our_port = free_port()
    stock = ServerProcess.start(
        "stock", stock_server_cmd(registry.model_uri, stock_port), stock_port, env, registry.root
    )
    ours = ServerProcess.start(
        "ours",
        our_server_cmd(registry.model_uri, our_port, "--max-request-bytes", str(MAX_REQUEST_BYTES)),
        our_port,
        env,
        registry.root,
    )
    try:
        stock.wait_ready()
        ours.wait_ready()
        with (
            httpx.Client(base_url=stock.url, timeout=60) as s,
            httpx.Client(base_url=ours.url, timeout=60) as o,
        ):
            yield s, o
    finally:
        ours.stop()
        stock.stop()


# -- the requests --------------------------------------------------------------------------------

ROWS = [
    [0.5, -1.25, 2.0, 0.0],
    [1.0, 2.0, 3.0, 4.0],
    [-0.75, 0.125, 10.5, -3.0],
]
JSON = "application/json"


def split(columns=FEATURES, data=ROWS, **extra) -> dict:
    return {"dataframe_split": {"columns": columns, "data": data, **extra}}


def records(rows=ROWS, columns=FEATURES) -> list[dict]:
    return [dict(zip(columns, row, strict=True)) for row in rows]


def csv(columns=FEATURES, rows=ROWS) -> bytes:
    lines = [",".join(columns)] + [",".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def body(obj) -> bytes:
    return json.dumps(obj).encode()


PARQUET = "application/vnd.apache.parquet"


def parquet(columns=FEATURES, rows=ROWS) -> bytes:
    import io

    import pandas as pd

    out = io.BytesIO()
    pd.DataFrame(rows, columns=list(columns)).to_parquet(out)
    return out.getvalue()


# (id, body, content type): stock answers 200 to each; ours must answer the same predictions.
GOOD = [
    ("split", body(split()), JSON),
    ("split-reordered-columns", body(split(FEATURES[::-1], [r[::-1] for r in ROWS])), JSON),
    ("split-extra-column", body(split([*FEATURES, "extra"], [[*r, 1.0] for r in ROWS])), JSON),
    ("split-extra-text-column", body(split([*FEATURES, "note"], [[*r, "hi"] for r in ROWS])), JSON),
    ("split-with-index", body(split(index=[7, 8, 9])), JSON),
    ("split-integers", body(split(data=[[1, 2, 3, 4], [0, -1, 5, 2]])), JSON),
    ("split-numeric-strings", body(split(data=[["0.5", "1", "2", "3"]])), JSON),
    ("split-booleans", body(split(data=[[True, False, 1.5, 2.0]])), JSON),
    ("split-one-row", body(split(data=ROWS[:1])), JSON),
    ("split-empty", body(split(data=[])), JSON),
    ("records", body({"dataframe_records": records()}), JSON),
    ("records-extra-key", body({"dataframe_records": [{**r, "z": "x"} for r in records()]}), JSON),
    ("instances-records", body({"instances": records()}), JSON),
    (
        "instances-columns",
        body({"instances": {c: [r[i] for r in ROWS] for i, c in enumerate(FEATURES)}}),
        JSON,
    ),
    (
        "inputs-columns",
        body({"inputs": {c: [r[i] for r in ROWS] for i, c in enumerate(FEATURES)}}),
        JSON,
    ),
    ("inputs-scalars", body({"inputs": dict(zip(FEATURES, ROWS[0], strict=True))}), JSON),
    ("inputs-records", body({"inputs": records()}), JSON),
    ("params", body({**split(), "params": {"anything": 1}}), JSON),
    ("unknown-top-level-key", body({**split(), "client_id": "abc"}), JSON),
    ("charset-utf8", body(split()), "application/json; charset=utf-8"),
    ("csv", csv(), "text/csv"),
    ("csv-reordered", csv(FEATURES[::-1], [r[::-1] for r in ROWS]), "text/csv"),
    ("parquet", parquet(), PARQUET),
    ("parquet-reordered", parquet(FEATURES[::-1], [r[::-1] for r in ROWS]), PARQUET),
    (
        "many-rows",
        body(split(data=synthetic_frame(300, seed=5)[FEATURES].round(6).to_numpy().tolist())),
        JSON,
    ),
]

S = SENTINEL
# (id, body, content type): stock and ours must agree on status and error_code.
BAD = [
    ("malformed-json", b'{"dataframe_split": {"columns": ["x0"], "data": [[987.654321', JSON),
    ("empty-body", b"", JSON),
    ("not-utf8", b"\xff\xfe\x00{", JSON),
    ("json-list", body([[S, 1, 2, 3]]), JSON),
    ("json-scalar", b"987.654321", JSON),
    ("no-input-key", body({"data": [[S, 1, 2, 3]]}), JSON),
    ("two-input-keys", body({**split(data=[[S, 1, 2, 3]]), "instances": records()}), JSON),
    ("missing-column", body(split(FEATURES[:3], [[S, 1, 2]])), JSON),
    ("wrong-column-name", body(split([*FEATURES[:3], "nope"], [[S, 1, 2, 3]])), JSON),
    ("no-columns", body({"dataframe_split": {"data": [[S, 1, 2, 3]]}}), JSON),
    ("duplicate-columns", body(split([*FEATURES, "x0"], [[S, 1, 2, 3, 4]])), JSON),
    ("text-value", body(split(data=[["abc", S, 2, 3]])), JSON),
    ("nested-value", body(split(data=[[[S], 1, 2, 3]])), JSON),
    ("row-too-short", body(split(data=[[S, 1, 2]])), JSON),
    ("row-too-long", body(split(data=[[S, 1, 2, 3, 4]])), JSON),
    ("flat-data", body(split(data=[S, 1, 2, 3])), JSON),
    ("split-not-a-dict", body({"dataframe_split": [[S, 1, 2, 3]]}), JSON),
    ("split-unknown-key", body(split(data=[[S, 1, 2, 3]], shape=[1, 4])), JSON),
    (
        "records-not-a-list",
        body({"dataframe_records": dict(zip(FEATURES, [S, 1, 2, 3], strict=True))}),
        JSON,
    ),
    ("records-missing-key", body({"dataframe_records": [{"x0": S, "x1": 1, "x2": 2}]}), JSON),
    ("records-as-lists", body({"dataframe_records": [[S, 1, 2, 3]]}), JSON),
    ("records-empty", body({"dataframe_records": []}), JSON),
    ("records-text-value", body({"dataframe_records": [{**records()[0], "x1": "abc"}]}), JSON),
    ("instances-tensor-shape", body({"instances": [[S, 1, 2, 3]]}), JSON),
    ("instances-text-value", body({"instances": [{**records()[0], "x1": "abc"}]}), JSON),
    ("inputs-missing-column", body({"inputs": {"x0": [S], "x1": [1.0], "x2": [2.0]}}), JSON),
    (
        "inputs-ragged-columns",
        body({"inputs": {"x0": [S, 1], "x1": [1], "x2": [2], "x3": [3]}}),
        JSON,
    ),
    ("inputs-tensor-shape", body({"inputs": [[S, 1, 2, 3]]}), JSON),
    ("llm-chat-payload", body({"messages": [{"role": "user", "content": "987.654321"}]}), JSON),
    ("csv-missing-column", csv(FEATURES[:3], [[S, 1, 2]]), "text/csv"),
    ("csv-text-value", csv(FEATURES, [["abc", S, 2, 3]]), "text/csv"),
    ("csv-empty", b"", "text/csv"),
    ("parquet-not-parquet", csv(), PARQUET),
    ("parquet-missing-column", parquet(FEATURES[:3], [r[:3] for r in ROWS]), PARQUET),
    ("content-type-text", body(split()), "text/plain"),
    ("content-type-xml", b"<rows/>", "application/xml"),
    ("content-type-uppercase", body(split()), "Application/JSON"),
    ("charset-latin1", body(split()), "application/json; charset=latin-1"),
    ("content-type-unknown-parameter", body(split()), "application/json; format=pandas-split"),
]


def _post(client: httpx.Client, data: bytes, content_type: str | None) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return client.post("/invocations", content=data, headers=headers)


def _error(resp: httpx.Response) -> dict:
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    return resp.json()


# -- tests ---------------------------------------------------------------------------------------


def test_our_server_uses_the_fast_keras_path_and_names_the_version(servers, registry):
    _, ours = servers
    resp = ours.get("/v1/model")
    assert resp.status_code == 200
    info = resp.json()
    assert info["name"] == MODEL_NAME
    assert info["version"] == registry.version
    assert info["uri"] == registry.model_uri
    assert info["fast_path"] is True, info
    assert ours.get("/ping").headers["x-model-version"] == registry.version


@pytest.mark.parametrize("path", ["/ping", "/health"])
def test_health_routes_match(servers, path):
    stock, ours = servers
    s, o = stock.get(path), ours.get(path)
    assert (o.status_code, o.text) == (s.status_code, s.text) == (200, "\n")


def test_version_route_returns_the_mlflow_version_like_stock(servers):
    import mlflow

    stock, ours = servers
    s, o = stock.get("/version"), ours.get("/version")
    assert s.status_code == o.status_code == 200
    assert o.text == s.text == mlflow.__version__


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/invocations"), ("POST", "/ping"), ("GET", "/no-such-route"), ("POST", "/")],
)
def test_unknown_routes_and_wrong_methods_match(servers, method, path):
    stock, ours = servers
    s, o = stock.request(method, path), ours.request(method, path)
    assert o.status_code == s.status_code
    assert o.json() == s.json()


@pytest.mark.parametrize(("data", "content_type"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_accepted_inputs_give_the_same_predictions(servers, data, content_type):
    stock, ours = servers
    s, o = _post(stock, data, content_type), _post(ours, data, content_type)
    assert s.status_code == 200, s.text
    assert o.status_code == 200, o.text
    expected, got = s.json(), o.json()
    assert set(got) == set(expected) == {"predictions"}
    assert np.allclose(numbers(got), numbers(expected), rtol=0, atol=ATOL)
    assert len(numbers(got)) == len(numbers(expected))
    # Same structure too: a list of {"prediction": value} records.
    assert [set(p) for p in got["predictions"]] == [set(p) for p in expected["predictions"]]


@pytest.mark.parametrize(("data", "content_type"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_rejected_inputs_get_the_same_status_and_error_code(servers, data, content_type):
    stock, ours = servers
    s, o = _post(stock, data, content_type), _post(ours, data, content_type)
    assert o.status_code == s.status_code, (s.text[:300], o.text[:300])
    assert 400 <= o.status_code < 500
    if s.headers["content-type"].startswith("application/json"):
        stock_error, our_error = _error(s), _error(o)
        assert our_error["error_code"] == stock_error["error_code"]
        # MLflow's optional classification fields, when it sets them.
        for key in ("sqlstate", "error_class"):
            assert our_error.get(key) == stock_error.get(key)
        # Ours: that shape only, no stack trace, nothing of the request echoed.
        assert set(our_error) <= {"error_code", "message", "sqlstate", "error_class"}
        assert our_error["message"]
        assert "987.654" not in our_error["message"]
        assert "Traceback" not in o.text
    else:  # 415s are plain text in MLflow
        assert o.headers["content-type"].startswith("text/plain")


def test_stock_echoes_the_request_in_errors_and_we_do_not(servers):
    """Why the sanitizing matters: stock sends the body back (and a stack trace)."""
    stock, ours = servers
    data = body(split(FEATURES[:3], [[SENTINEL, 1, 2]]))
    s, o = _post(stock, data, JSON), _post(ours, data, JSON)
    assert s.status_code == o.status_code == 400
    assert "987.654" in s.text
    assert "987.654" not in o.text
    assert "missing inputs" in o.json()["message"]
    # Parse errors: stock adds the server's stack trace.
    data = csv(FEATURES, [["abc", SENTINEL, 2, 3]])
    s, o = _post(stock, data, "text/csv"), _post(ours, data, "text/csv")
    assert s.status_code == o.status_code == 400
    assert "Traceback" in s.json()["stack_trace"]
    assert "stack_trace" not in o.json()


# -- deliberate differences ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"dataframe_split": {"columns": ["x0", "x1", "x2", "x3"], "data": [[NaN, 1, 2, 3]]}}',
        b'{"dataframe_split": {"columns": ["x0", "x1", "x2", "x3"], "data": [[1, Infinity, 2, 0]]}'
        b"}",
        b'{"dataframe_records": [{"x0": -Infinity, "x1": 1, "x2": 2, "x3": 3}]}',
        body(split(data=[[None, 1, 2, 3]])),
        body(split(data=[[1e39, 1, 2, 3]])),  # finite as JSON, infinite as the model's float32
        body({"dataframe_records": [records()[0], {"x0": 1, "x1": 2, "x2": 3}]}),  # a gap -> NaN
    ],
    ids=["nan", "infinity", "minus-infinity", "null", "float32-overflow", "records-with-gap"],
)
def test_non_finite_values_are_a_clear_400_where_stock_answers_nan(servers, data):
    stock, ours = servers
    o = _post(ours, data, JSON)
    assert o.status_code == 400
    error = _error(o)
    assert error["error_code"] == "BAD_REQUEST"
    assert "finite" in error["message"].lower() or "not a valid JSON number" in error["message"]
    # Stock MLflow: 200 with NaN (or Infinity) predictions, which is not valid JSON.
    s = _post(stock, data, JSON)
    assert s.status_code == 200
    assert "NaN" in s.text or "Infinity" in s.text


def test_oversized_body_is_413_where_stock_reads_it_all(servers):
    stock, ours = servers
    rows = synthetic_frame(4000, seed=9)[FEATURES].to_numpy().tolist()
    data = body(split(data=rows))
    assert len(data) > MAX_REQUEST_BYTES
    o = _post(ours, data, JSON)
    assert o.status_code == 413
    error = _error(o)
    assert error["error_code"] == "BAD_REQUEST"
    assert str(MAX_REQUEST_BYTES) in error["message"]
    # The connection stays usable, and the same rows in smaller requests are fine.
    assert _post(ours, body(split(data=rows[:100])), JSON).status_code == 200
    # Stock has no limit: it parses and predicts the whole body.
    s = _post(stock, data, JSON)
    assert s.status_code == 200
    assert len(s.json()["predictions"]) == len(rows)


def test_missing_content_type_is_415_where_stock_fails_with_500(servers):
    stock, ours = servers
    o = _post(ours, body(split()), None)
    assert o.status_code == 415
    assert "Content-Type" in o.text
    assert _post(stock, body(split()), None).status_code == 500


def test_registry_uris_are_pinned_to_the_version_they_resolve_to(registry):
    """What /v1/model and X-Model-Version report for alias and run URIs (no server needed)."""
    import mlflow

    from serving.server.loader import resolve_identity

    client = mlflow.MlflowClient(registry.tracking_uri)
    client.set_registered_model_alias(MODEL_NAME, "champion", registry.version)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
        alias = resolve_identity(f"models:/{MODEL_NAME}@champion")
        latest = resolve_identity(f"models:/{MODEL_NAME}/latest")
        run_id = client.get_model_version(MODEL_NAME, registry.version).run_id
        run = resolve_identity(f"runs:/{run_id}/model")
    assert (alias.name, alias.version) == (MODEL_NAME, registry.version)
    assert alias.download_uri == registry.model_uri  # the alias may move; we keep the version
    assert latest.version == registry.version
    assert (run.run_id, run.version) == (run_id, None)
