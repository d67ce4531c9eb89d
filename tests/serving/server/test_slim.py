"""The slim path: a model trained by the pipeline carries a LiteRT artifact, and the server runs
it with ai-edge-litert and numpy, never importing TensorFlow; an artifact that does not
reproduce its Keras check predictions, or a missing runtime, means the TensorFlow path serves.

Real parts: ml.train trains and logs to a SQLite MLflow store, the real LiteRT runtime runs
the artifact, the server runs as its own process over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from serving.server.contract import LITERT_ARTIFACT_KEY, LITERT_CHECK_FILE, SLIM_ATOL, SLIM_RTOL
from serving.server.loader import load_model
from serving.server.slim import LiteRTPath
from tests.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
FEATURES = ["x0", "x1", "x2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The project's Keras pyfunc (ml.train, two epochs), downloaded to a local folder."""
    import mlflow

    from ml.settings import TrainingSettings
    from ml.train import SLIM_ARTIFACT_TAG, train_model

    root = tmp_path_factory.mktemp("slim")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        try:
            rng = np.random.default_rng(0)
            frame = pd.DataFrame(rng.normal(size=(200, 3)) * 10, columns=FEATURES)
            frame["target"] = frame.sum(axis=1) * 3 + 50
            settings = TrainingSettings(epochs=2, hidden_units=[8], threads=1)
            result = train_model(frame, FEATURES, "target", settings, experiment_name="slim")
            tags = mlflow.MlflowClient().get_run(result.run_id).data.tags
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=result.model_uri, dst_path=str(root / "downloaded")
            )
        finally:
            mlflow.set_tracking_uri(None)
    yield {"path": local, "frame": frame, "tag": tags.get(SLIM_ARTIFACT_TAG, "")}


def _within(got, expected) -> bool:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return bool(np.all(np.abs(got - expected) <= SLIM_ATOL + SLIM_RTOL * np.abs(expected)))


def test_the_pipeline_logs_the_artifact_and_the_loader_serves_it_within_tolerance(trained):
    assert trained["tag"].startswith("litert"), trained["tag"]
    slim = load_model(trained["path"])
    assert isinstance(slim.fast, LiteRTPath), slim.fast_path_note
    assert slim.fast_path_note.startswith("litert runtime, no TensorFlow")
    assert slim.flavor == "pyfunc:keras_pyfunc.py"

    features = trained["frame"][FEATURES]
    keras = load_model(trained["path"], fast_path=False).pyfunc.predict(features)["prediction"]
    fast = slim.fast.predict(features.to_numpy("float32"))
    assert _within(fast, keras)
    # The reference path (MLflow's schema enforcement) runs the same interpreter, and maps
    # columns by name.
    reordered = features[["x2", "x0", "x1"]]
    assert np.array_equal(slim.pyfunc.predict(reordered)["prediction"].to_numpy(), fast)
    # Batches of different sizes in any order give each row the same answer.
    assert np.array_equal(slim.fast.predict(features.to_numpy("float32")[:1]), fast[:1])
    assert np.array_equal(slim.fast.predict(features.to_numpy("float32")[:7]), fast[:7])
    with pytest.raises(ValueError, match="expected 3 feature columns"):
        slim.fast.predict(np.ones((2, 4), dtype=np.float32))


PROBE = """
import json, sys
import numpy as np
import pandas as pd
from serving.server.loader import load_model
model = load_model(sys.argv[1])
rows = np.asarray([[1.0, 2.0, 3.0], [-4.0, 0.5, 9.0]], dtype=np.float32)
fast = model.fast.predict(rows)
frame = pd.DataFrame(rows.astype("float64"), columns=["x0", "x1", "x2"])
pyfunc = model.pyfunc.predict(frame)["prediction"].to_numpy()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print(json.dumps({"note": model.fast_path_note, "same": bool(np.array_equal(fast, pyfunc)),
                  "heavy": loaded[:5]}))
"""


def _probe(path: str, *prelude: str) -> dict:
    code = "\n".join(prelude) + textwrap.dedent(PROBE)
    proc = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_and_predicting_in_a_fresh_interpreter_never_imports_tensorflow(trained):
    result = _probe(trained["path"])
    assert result["note"].startswith("litert runtime"), result
    assert result["same"]
    assert result["heavy"] == [], f"TensorFlow/Keras imported on the slim path: {result}"


def test_without_the_runtime_the_tensorflow_path_serves_and_says_why(trained, caplog):
    # The runtime made unimportable in that interpreter only (as in the full serving image).
    result = _probe(trained["path"], "import sys; sys.modules['ai_edge_litert'] = None")
    assert result["note"].startswith("keras concrete function"), result
    assert result["heavy"], "the fallback is the TensorFlow path"


def test_an_artifact_that_does_not_reproduce_keras_is_refused(trained, tmp_path, caplog):
    copy = Path(shutil.copytree(trained["path"], tmp_path / "model"))
    check_file = next((copy / "artifacts").rglob(LITERT_CHECK_FILE))
    assert LITERT_ARTIFACT_KEY in str(check_file.relative_to(copy))
    check = json.loads(check_file.read_text())
    check["outputs"][0] += 0.01
    check_file.write_text(json.dumps(check))
    with caplog.at_level("INFO", logger="serving.server.loader"):
        loaded = load_model(str(copy))
    assert not isinstance(loaded.fast, LiteRTPath)
    assert loaded.fast_path_note.startswith("keras concrete function")
    assert "does not reproduce the Keras predictions" in caplog.text


def test_the_server_micro_batches_the_slim_path_and_answers_like_keras(trained, tmp_path):
    from tests.integration.test_server_protocol import ServerProcess, child_env, our_server_cmd

    port = free_port()
    server = ServerProcess.start(
        "slim",
        our_server_cmd(trained["path"], port, "--batch-wait-ms", "2"),
        port,
        child_env("sqlite:///" + str(tmp_path / "unused.db")),
        tmp_path,
    )
    try:
        server.wait_ready()
        described = httpx.get(f"{server.url}/v1/model", timeout=10).json()
        assert described["fast_path"] and described["fast_path_note"].startswith("litert")
        rows = trained["frame"][FEATURES].head(24)
        keras = load_model(trained["path"], fast_path=False).pyfunc.predict(rows)["prediction"]
        calls_and_requests = []
        for _ in range(4):
            got = asyncio.run(_concurrent(server.url, rows.to_numpy().tolist()))
            assert _within(got, keras.to_numpy())
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            calls_and_requests.append(
                (
                    _metric(metrics, "model_server_batch_requests_count"),
                    _metric(metrics, "model_server_batch_requests_sum"),
                )
            )
            calls, requests = calls_and_requests[-1]
            if requests > calls:
                break
        # Concurrent requests shared model calls.
        assert requests > calls, calls_and_requests
    finally:
        server.stop()


async def _concurrent(url: str, rows: list) -> list[float]:
    limits = httpx.Limits(max_connections=len(rows))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    "/invocations", json={"dataframe_split": {"columns": FEATURES, "data": [row]}}
                )
                for row in rows
            )
        )
    out = []
    for response in responses:
        assert response.status_code == 200, response.text
        out.append(response.json()["predictions"][0]["prediction"])
    return out


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )
