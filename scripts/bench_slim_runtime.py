"""LiteRT vs ONNX Runtime for the project's Keras regressor, without TensorFlow at serving time.

    .venv/bin/python scripts/bench_slim_runtime.py [--rows 10000] [--repeats 5]

Trains the project's regressor (``ml.model.build_model``, default hidden layers) twice: on the
pipeline's synthetic electricity-load data (``project``) and on a harsher synthetic set with
feature scales from 1 to 50 and targets up to ~300 (``wide``); converts each to (a) LiteRT
with TensorFlow's own ``tf.lite.TFLiteConverter`` and
(b) ONNX with ``tf2onnx``, then measures each runtime in a fresh interpreter of its own venv
holding only the runtime and numpy (made with uv under ``.local/bench-slim/``, so the sizes are
what a slim image would install and TensorFlow cannot sneak in): the largest difference from
the Keras model's direct call on ``--rows`` rows, per-call latency (1 row, 256 rows, and batch
sizes cycling 1..16 as a micro-batcher makes them), RSS after load, and installed size.
Prints a markdown table and the 1-minute load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from serving.server.contract import SLIM_ATOL, SLIM_RTOL

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".local" / "bench-slim"
UV = Path(sys.executable).with_name("uv")
RUNTIMES = {
    "litert": ["ai-edge-litert==2.3.0"],
    "onnxruntime": ["onnxruntime==1.31.1"],
}
CONVERTER = ["tf2onnx==1.17.0", "onnx==1.23.2"]

# Runs in the runtime's own venv: runtime + numpy only.
PROBE = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import numpy as np
kind, model_path, data_path, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ATOL, RTOL = float(sys.argv[5]), float(sys.argv[6])
if kind == "litert":
    import threading
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=model_path, num_threads=1)
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    state = {"shape": None}
    def run(rows):
        if rows.shape != state["shape"]:
            it.resize_tensor_input(inp, rows.shape, strict=True)
            it.allocate_tensors()
            state["shape"] = rows.shape
        it.set_tensor(inp, rows)
        it.invoke()
        return it.get_tensor(out)
else:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    def run(rows):
        return session.run(None, {name: rows})[0]
data = np.load(data_path)
x, expected = data["x"], data["y"]
run(x[:1])
load_s = time.perf_counter() - t0
rss_mb = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
chunks = [np.ascontiguousarray(x[i:i + 256]) for i in range(0, len(x), 256)]
got = np.concatenate([run(c).reshape(-1) for c in chunks])
delta = np.abs(got.astype(np.float64) - expected)
diff = float(np.max(delta))
rel = float(np.max(delta / np.maximum(np.abs(expected), 1.0)))
within = bool(np.all(delta <= ATOL + RTOL * np.abs(expected)))
def per_call(batches, calls):
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(calls):
            run(batches[i % len(batches)])
        best.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(best)
one = [np.ascontiguousarray(x[:1])]
big = [np.ascontiguousarray(x[:256])]
mixed = [np.ascontiguousarray(x[:n]) for n in range(1, 17)]
print(json.dumps({
    "diff": diff, "rel": rel, "within": within, "load_s": load_s, "rss_mb": rss_mb,
    "ms_1": per_call(one, 5000), "ms_256": per_call(big, 1000), "ms_mixed": per_call(mixed, 5000),
    "tensorflow_loaded": any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules),
}))
"""

# Installed size per distribution of a venv (from each distribution's RECORD).
SIZES = r"""
import json, os
from importlib import metadata
out = {}
for dist in metadata.distributions():
    total = 0
    for f in dist.files or []:
        p = dist.locate_file(f)
        if os.path.isfile(p):
            total += os.path.getsize(p)
    out[dist.metadata["Name"].lower()] = total
print(json.dumps(out))
"""


def runtime_venv(name: str, numpy_version: str) -> Path:
    venv = WORK / f"venv-{name}"
    python = venv / "bin" / "python"
    stamp = venv / ".complete"
    pins = [f"numpy=={numpy_version}", *RUNTIMES[name]]
    if not stamp.exists() or stamp.read_text() != " ".join(pins):
        subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True)
        subprocess.run([UV, "pip", "install", "--quiet", "--python", python, *pins], check=True)
        stamp.write_text(" ".join(pins))
    return python


def converter_path() -> Path:
    target = WORK / "tf2onnx"
    if not (target / ".complete").exists():
        # --no-deps: everything else it needs is already in the project venv (TF, protobuf,
        # numpy); a full resolve could move those.
        subprocess.run(
            [UV, "pip", "install", "--quiet", "--no-deps", "--target", target, *CONVERTER],
            check=True,
        )
        (target / ".complete").touch()
    return target


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def project_data(rows: int):
    """The pipeline's own synthetic electricity-load data (ml.data): 30 days to train on,
    ``rows`` rows of later days to compare on."""
    from datetime import date, timedelta

    import pandas as pd

    from ml.data import SYNTHETIC_FEATURES
    from ml.settings import DataSettings
    from ml.synthetic import synthetic_partition

    settings = DataSettings()

    def days(first: int, n: int):
        start = date(2026, 1, 1)
        frame = pd.concat(
            [synthetic_partition(start + timedelta(days=first + d), settings) for d in range(n)]
        )
        return (
            frame[SYNTHETIC_FEATURES].to_numpy("float32"),
            frame["target"].to_numpy("float32"),
        )

    x, y = days(0, 30)
    per_day = len(x) // 30
    x_check, _ = days(30, -(-rows // per_day))
    return x, y, x_check[:rows]


def wide_data(rows: int):
    """A harsher case: 8 features on scales from 1 to 50, targets up to ~300."""
    import numpy as np

    rng = np.random.default_rng(0)
    scale = np.asarray([1, 2, 5, 10, 1, 1, 3, 50], dtype="float32")
    x = (rng.normal(size=(4000, 8)) * scale).astype("float32")
    y = (x @ rng.normal(size=8) + 100 + np.sin(x[:, 0]) * 5).astype("float32")
    x_check = (np.random.default_rng(1).normal(size=(rows, 8)) * scale).astype("float32")
    return x, y, x_check


DATASETS = {"project": project_data, "wide": wide_data}


def train(x, y):
    from ml.model import build_model, set_global_determinism

    set_global_determinism(0)
    model = build_model(
        x.shape[1],
        [64, 32],  # TrainingSettings' default
        0.01,
        feature_mean=x.mean(0),
        feature_variance=x.var(0),
        target_mean=float(y.mean()),
        target_std=float(y.std()),
    )
    model.fit(x, y, epochs=5, batch_size=64, verbose=0)
    return model


def convert_litert(model, out: Path) -> dict:
    from ml.export import to_litert

    t = time.perf_counter()
    out.write_bytes(to_litert(model))
    return {"ok": True, "convert_s": time.perf_counter() - t, "bytes": out.stat().st_size}


def convert_onnx(model, out: Path) -> dict:
    import tensorflow as tf

    sys.path.insert(0, str(converter_path()))
    import tf2onnx

    spec = [tf.TensorSpec([None, model.input_shape[-1]], tf.float32, name="features")]
    t = time.perf_counter()
    try:
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(out))
    except Exception as exc:
        return {"ok": False, "error": f"tf2onnx.convert.from_keras: {exc!r}"[:300]}
    return {"ok": True, "convert_s": time.perf_counter() - t, "bytes": out.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    WORK.mkdir(parents=True, exist_ok=True)
    load_before = load1()

    import numpy as np

    pythons = {name: runtime_venv(name, np.__version__) for name in RUNTIMES}
    results = {}
    ranges = {}
    tolerance = [str(SLIM_ATOL), str(SLIM_RTOL)]
    for dataset, make in DATASETS.items():
        x_train, y_train, x = make(args.rows)
        model = train(x_train, y_train)
        # The reference: the direct call the project's pyfunc and fast path make.
        y = np.asarray(model(x, training=False)).reshape(-1).astype("float64")
        ranges[dataset] = (float(y.min()), float(y.max()))
        data = WORK / f"rows-{dataset}.npz"
        np.savez(data, x=x, y=y)
        files = {
            "litert": WORK / f"{dataset}.tflite",
            "onnxruntime": WORK / f"{dataset}.onnx",
        }
        conversions = {
            "litert": convert_litert(model, files["litert"]),
            "onnxruntime": convert_onnx(model, files["onnxruntime"]),
        }
        for name, python in pythons.items():
            result = {"conversion": conversions[name]}
            if conversions[name]["ok"]:
                probe = subprocess.run(
                    [python, "-c", PROBE, name, files[name], data, str(args.repeats), *tolerance],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result.update(json.loads(probe.stdout.strip().splitlines()[-1]))
            sizes = json.loads(
                subprocess.run(
                    [python, "-c", SIZES], capture_output=True, text=True, check=True
                ).stdout
            )
            result["sizes_mb"] = {k: round(v / 1e6, 1) for k, v in sorted(sizes.items())}
            results[(dataset, name)] = result
    load_after = load1()

    import keras
    import tensorflow as tf

    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, numpy {np.__version__}")
    print(
        f"{args.rows} rows per model; Keras predictions in "
        + ", ".join(f"{d}: [{lo:.1f}, {hi:.1f}]" for d, (lo, hi) in ranges.items())
        + f"; tolerance |diff| <= {SLIM_ATOL:g} + {SLIM_RTOL:g} x |keras|; "
        "max rel diff = max |diff| / max(|keras|, 1)"
    )
    print(
        "| model | runtime | converts | max abs diff vs Keras | max rel diff | within tolerance "
        "| 1 row ms | 256 rows ms "
        "| 1..16 rows ms | RSS after load MB | import+load s | installed MB (runtime / its deps"
        " / numpy) | TF in sys.modules |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (dataset, name), r in results.items():
        conv = r["conversion"]
        sizes = r["sizes_mb"]
        runtime = sum(v for k, v in sizes.items() if k.replace("_", "-") in _main_dist(name))
        numpy_mb = sizes.get("numpy", 0.0)
        deps = sum(sizes.values()) - runtime - numpy_mb
        if not conv["ok"]:
            print(
                f"| {dataset} | {name} | no: {conv['error']} | | | | | | | | "
                f"| {runtime:.0f} / {deps:.0f} / {numpy_mb:.0f} | |"
            )
            continue
        print(
            f"| {dataset} | {name} | yes ({conv['convert_s']:.2f} s, {conv['bytes']} B) "
            f"| {r['diff']:.1e} "
            f"| {r['rel']:.1e} | {r['within']} "
            f"| {r['ms_1']:.4f} | {r['ms_256']:.4f} | {r['ms_mixed']:.4f} | {r['rss_mb']:.0f} "
            f"| {r['load_s']:.2f} | {runtime:.0f} / {deps:.0f} / {numpy_mb:.0f} "
            f"| {r['tensorflow_loaded']} |"
        )
    for name in RUNTIMES:
        print(f"{name} venv: {results[('project', name)]['sizes_mb']}")
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after")
    return 0


def _main_dist(name: str) -> set[str]:
    return {"litert": {"ai-edge-litert"}, "onnxruntime": {"onnxruntime"}}[name]


if __name__ == "__main__":
    sys.exit(main())
