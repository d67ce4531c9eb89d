"""The slim serving image against its targets: size, RSS, start to ready, predictions vs Keras.

    .venv/bin/python scripts/bench_slim_image.py [--rounds 3] [--no-build]

Builds the image (scripts/build_images.sh serving-slim), starts a real ``mlflow server`` on
127.0.0.1, trains and registers a small Keras regressor with ``ml.train`` (with its LiteRT
artifact), then runs the image ``--rounds`` times as a pod runs it (read-only root, uid 10001,
no capabilities; host network for the loopback MLflow). Measures PID 1's start
(``/proc/1/stat``, the host's clock) to the first ``/ping`` 200 and its CPU time, ``podman
run`` to ready, RSS after ready and after a 10,000-row request, and those predictions' largest
difference from Keras's (MLflow's pyfunc in this process); prints a table with the targets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.benchlib.servers import free_port  # noqa: E402
from serving.server.contract import SLIM_ATOL, SLIM_RTOL  # noqa: E402

IMAGE = os.environ.get("SERVING_SLIM_IMAGE", "train-and-deploy/serving-slim:latest")
PODMAN = os.environ.get("PODMAN", "podman --runtime runc").split()
FEATURES = ["x0", "x1", "x2", "x3"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    proc = subprocess.Popen(
        [
            str(bin_dir / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env=env,
        stdout=open(root / "mlflow.log", "wb"),  # noqa: SIM115 - the process owns it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((root / "mlflow.log").read_text()[-3000:])
        time.sleep(0.5)


def train_and_register(tracking_uri: str) -> tuple[str, pd.DataFrame, np.ndarray]:
    import mlflow

    from ml.settings import TrainingSettings
    from ml.train import train_model

    mlflow.set_tracking_uri(tracking_uri)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2000, len(FEATURES))) * [1, 3, 10, 0.5]
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["target"] = x @ [3.0, -2.0, 0.5, 4.0] + 10 + np.sin(x[:, 0])
    settings = TrainingSettings(epochs=10, batch_size=64, hidden_units=[64, 32])
    result = train_model(frame, FEATURES, "target", settings, experiment_name="bench-slim-image")
    version = mlflow.register_model(result.model_uri, "bench-slim").version
    uri = f"models:/bench-slim/{version}"
    rows = pd.DataFrame(
        np.random.default_rng(8).normal(size=(10_000, len(FEATURES))) * [1, 3, 10, 0.5],
        columns=FEATURES,
    )
    # The Keras model through MLflow's own pyfunc (TensorFlow, in this process).
    keras = mlflow.pyfunc.load_model(uri).predict(rows)["prediction"].to_numpy(np.float64)
    return uri, rows, keras


def proc_stat(name: str) -> tuple[float, float]:
    """(start time in s since boot, CPU seconds used) of the container's PID 1."""
    fields = podman("exec", name, "cat", "/proc/1/stat").stdout.rsplit(")", 1)[1].split()
    # After the command name: field 3 is index 0; utime 14, stime 15, starttime 22.
    return int(fields[19]) / CLK_TCK, (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(name: str) -> float:
    line = podman("exec", name, "grep", "VmRSS", "/proc/1/status").stdout.split()
    return int(line[1]) / 1024


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def one_round(tracking_uri: str, uri: str, rows: pd.DataFrame, keras: np.ndarray, i: int):
    name = f"bench-slim-{os.getpid()}-{i}"
    port = free_port()
    podman("rm", "--force", "--ignore", name)
    t0 = time.monotonic()
    run = podman(
        "run", "--detach", "--name", name, "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--network", "host",
        "--env", f"SERVING_MODEL_URI={uri}", "--env", f"MLFLOW_TRACKING_URI={tracking_uri}",
        IMAGE, "--host", "127.0.0.1", "--port", str(port),
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(run.stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=2) as client:
            while True:
                try:
                    if client.get(f"{url}/ping").status_code == 200:
                        ready_at = uptime()
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > 120:
                    raise RuntimeError(podman("logs", name).stderr[-3000:])
                time.sleep(0.02)
        run_to_ready = time.monotonic() - t0
        started, cpu = proc_stat(name)
        rss_ready = rss_mb(name)
        note = httpx.get(f"{url}/v1/model", timeout=5).json()["fast_path_note"]
        payload = {"dataframe_split": {"columns": FEATURES, "data": rows.to_numpy().tolist()}}
        response = httpx.post(f"{url}/invocations", json=payload, timeout=60)
        response.raise_for_status()
        got = np.asarray([p["prediction"] for p in response.json()["predictions"]], np.float64)
        return {
            "start_to_ready": ready_at - started,
            "cpu_s": cpu,
            "run_to_ready": run_to_ready,
            "rss_ready": rss_ready,
            "rss_after": rss_mb(name),
            "diff": float(np.max(np.abs(got - keras))),
            "within": bool(np.all(np.abs(got - keras) <= SLIM_ATOL + SLIM_RTOL * np.abs(keras))),
            "note": note,
        }
    finally:
        podman("rm", "--force", "--ignore", "--time", "5", name, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_before = load1()
    if not args.no_build:
        subprocess.run(
            ["bash", str(REPO / "scripts" / "build_images.sh"), "serving-slim"], check=True
        )
    size_mb = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout) / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-slim-") as tmp:
        mlflow_proc, tracking_uri = start_mlflow(Path(tmp))
        try:
            uri, rows, keras = train_and_register(tracking_uri)
            rounds = [one_round(tracking_uri, uri, rows, keras, i) for i in range(args.rounds)]
        finally:
            mlflow_proc.terminate()
            mlflow_proc.wait(30)
    load_after = load1()

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(f"image {IMAGE}; {args.rounds} rounds (median); serving path: {rounds[0]['note']}")
    print("| what | measured | target |  |")
    print("|---|---|---|---|")
    worst = max(r["diff"] for r in rounds)
    rows_out = [
        ("image size (podman image inspect .Size)", f"{size_mb:.0f} MB", 400, size_mb),
        ("server RSS after ready", f"{med('rss_ready'):.0f} MB", 200, med("rss_ready")),
        ("server RSS after a 10,000-row request", f"{med('rss_after'):.0f} MB", 200,
         med("rss_after")),
        ("process start to ready (`/ping` 200)", f"{med('start_to_ready'):.2f} s", 3,
         med("start_to_ready")),
        ("CPU time of the server up to ready", f"{med('cpu_s'):.2f} s", None, None),
        ("`podman run` to ready", f"{med('run_to_ready'):.2f} s", None, None),
        ("max abs diff vs Keras, 10,000 rows over HTTP", f"{worst:.1e}", 1e-5, worst),
    ]  # fmt: skip
    for what, shown, limit, value in rows_out:
        if limit is None:
            print(f"| {what} | {shown} | | |")
        else:
            print(f"| {what} | {shown} | <= {limit:g} | {'met' if value <= limit else 'NOT met'} |")
    for r in rounds:
        print({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in r.items() if k != "note"})
    print(f"Keras predictions in [{keras.min():.1f}, {keras.max():.1f}]")
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
