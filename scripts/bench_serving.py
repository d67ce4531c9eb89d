"""Benchmark the model server against stock MLflow serving, in one run, on one model version.

    .venv/bin/python scripts/bench_serving.py            # ~6 minutes; writes docs/benchmarks.md
    make bench-serving
    .venv/bin/python scripts/bench_serving.py --rounds 1 --duration 3 --no-write   # a quick look
    .venv/bin/python scripts/bench_serving.py --baseline HEAD~3   # what a change costs

What it does, all on 127.0.0.1 and bounded in time:

1. Trains the project's regressor (``ml.train.train_model``, default network, a few epochs) on
   the built-in synthetic data in a throwaway SQLite MLflow store, registers it, and also logs a
   plain ``mlflow.tensorflow.log_model`` copy of the same network and a scikit-learn ``Ridge``
   on the same columns (``mlflow.sklearn.log_model``), each registered separately.
   ``--tracking-uri/--model-name/--model-version`` benchmark an existing version instead (the
   two other models are then logged into that store's ``bench-serving`` experiment).
2. Starts each server with one worker: a bare ASGI echo app that parses the same JSON (the
   ceiling for this HTTP stack), ``mlflow models serve --env-manager local`` on the pyfunc
   version, the same on the tensorflow-flavor copy and on the scikit-learn model, and
   ``python -m serving.server`` on each of the three. Idle servers use no CPU; only the one
   under load works.
3. Checks that every model server answers the same predictions as stock MLflow on the same
   model (the Keras copies: as stock on the pyfunc version; single-row requests and one
   batch request; atol 1e-5).
4. Runs ``wrk`` (single-row ``dataframe_split`` POSTs, 1 and 8 connections, ``--duration`` s per
   cell after a short warm-up) in ``--rounds`` interleaved rounds, so that a noisy moment on a
   shared machine hits every server alike; keeps the median of each number, the CPU time the
   server's process tree used per request (from ``/proc``), the RSS of each server's process
   tree, and for ``this-server`` how many requests shared a model call (from its ``/metrics``).
   With ``--baseline REV``, ``this-server@REV`` (the ``serving`` package as of git revision REV,
   from ``git archive``, same model and settings) is measured in the same interleaved rounds:
   on a shared machine the echo ceiling moves a lot between runs, and the throughput and CPU
   per request of the same server as it was before a change, measured alongside, are what
   tells what the change cost.
   Each round starts one server further on in the list, so that no server is always measured
   right after the same one.
5. Prints a table with ratios and the targets, and rewrites the ``bench-serving`` section of
   ``docs/benchmarks.md`` (other sections are kept).

Needs ``wrk`` on PATH (Debian package ``wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The parts, in scripts/benchlib/: models.py (step 1), servers.py, proctree.py and echo.py (step 2),
# parity.py (step 3), wrk.py and rounds.py (step 4), report.py and doc.py (step 5), baseline.py
# (--baseline); bench_batch.py and bench_payload_log.py use them too.
from scripts.benchlib.baseline import baseline_tree  # noqa: E402
from scripts.benchlib.doc import DOC, write_doc  # noqa: E402
from scripts.benchlib.echo import run_echo_server  # noqa: E402
from scripts.benchlib.models import prepare_models  # noqa: E402
from scripts.benchlib.report import build_report  # noqa: E402
from scripts.benchlib.rounds import run_benchmark  # noqa: E402
from scripts.benchlib.servers import (  # noqa: E402
    Server,
    free_port,
    start_server,
    stop,
)
from scripts.benchlib.wrk import WRK_LUA  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured cell")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load first")
    parser.add_argument("--connections", default="1,8", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (own model)")
    parser.add_argument("--tracking-uri", help="benchmark a model in this store instead")
    parser.add_argument("--model-name", help="registered model (with --tracking-uri)")
    parser.add_argument("--model-version", help="its version (with --model-name)")
    parser.add_argument("--skip-tensorflow-flavor", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure the server as of this git revision, in the same rounds",
    )
    parser.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        run_echo_server(args.echo_server)
        return 0
    if args.model_name and not (args.tracking_uri and args.model_version):
        parser.error("--model-name needs --tracking-uri and --model-version")
    args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    started = time.monotonic()
    args.load_before = os.getloadavg()[0]
    print(f"work dir: {workdir}", flush=True)
    models = prepare_models(args, workdir)
    payload = {"dataframe_split": {"columns": models["columns"], "data": [models["payload_row"]]}}
    lua = workdir / "post.lua"
    lua.write_text(WRK_LUA.format(body=json.dumps(payload)))

    py = sys.executable
    stock = [py, "-m", "mlflow", "models", "serve", "--env-manager", "local", "-h", "127.0.0.1"]

    def stock_cmd(uri: str, port: int) -> list[str]:
        return [*stock, "-m", uri, "-p", str(port), "--workers", "1"]

    def ours_cmd(uri: str, port: int) -> list[str]:
        return [py, "-m", "serving.server", "--model-uri", uri, "--port", str(port)]

    servers = [
        ("echo", lambda p: [py, str(Path(__file__).resolve()), "--echo-server", str(p)]),
        ("stock-pyfunc", lambda p: stock_cmd(models["pyfunc_uri"], p)),
        ("stock-tensorflow", lambda p: stock_cmd(models["tf_uri"], p)),
        ("this-server", lambda p: ours_cmd(models["pyfunc_uri"], p)),
        ("this-server-tensorflow", lambda p: ours_cmd(models["tf_uri"], p)),
        ("stock-sklearn", lambda p: stock_cmd(models["sklearn_uri"], p)),
        ("this-server-sklearn", lambda p: ours_cmd(models["sklearn_uri"], p)),
    ]
    if args.skip_tensorflow_flavor:
        servers = [s for s in servers if not s[0].endswith("-tensorflow")]
    paths: dict[str, str] = {}
    if args.baseline:
        rev, tree = baseline_tree(args.baseline, workdir)
        args.baseline_label = f"this-server@{rev}"
        paths[args.baseline_label] = str(tree)
        servers.append((args.baseline_label, lambda p: ours_cmd(models["pyfunc_uri"], p)))

    # Order matters: the echo app first, then stock on the pyfunc version (the reference
    # for the prediction check), then the others.
    running: list[Server] = []
    try:
        for label, make_cmd in servers:
            port = free_port()
            running.append(
                start_server(label, make_cmd(port), port, models, workdir, paths.get(label))
            )
        cells = run_benchmark(running, models, lua, args)
    finally:
        for server in running:
            stop(server.proc)

    report = build_report(cells, models, args, time.monotonic() - started)
    print("\n" + report["text"])
    if not args.no_write:
        write_doc(report["markdown"])
        print(f"\nwrote {DOC.relative_to(REPO)}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["predictions_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
