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
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.benchlib.baseline import baseline_tree  # noqa: E402
from scripts.benchlib.echo import echo_app, run_echo_server  # noqa: E402
from scripts.benchlib.models import CHECK_ROWS, prepare_models  # noqa: E402
from scripts.benchlib.parity import numbers, predictions, reference_of  # noqa: E402
from scripts.benchlib.proctree import tree_cpu_s, tree_rss_mb  # noqa: E402
from scripts.benchlib.rounds import Cell, batch_counts, run_benchmark  # noqa: E402
from scripts.benchlib.servers import Server, child_env, free_port, start_server, stop, wait_ready  # noqa: E402
from scripts.benchlib.wrk import WRK_LUA, run_wrk  # noqa: E402

# Importable from here as before (bench_batch.py, bench_payload_log.py use them).
__all__ = [
    "CHECK_ROWS",
    "WRK_LUA",
    "Cell",
    "Server",
    "baseline_tree",
    "batch_counts",
    "child_env",
    "echo_app",
    "free_port",
    "numbers",
    "predictions",
    "prepare_models",
    "reference_of",
    "run_benchmark",
    "run_echo_server",
    "run_wrk",
    "start_server",
    "stop",
    "tree_cpu_s",
    "tree_rss_mb",
    "wait_ready",
]

DOC = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-serving:begin -->"
END = "<!-- bench-serving:end -->"
ATOL = 1e-5
TARGETS = {
    "vs_stock_same_version": 3.0,
    # Issue 14: this server on the plain mlflow.tensorflow model vs stock on it, 8 clients.
    "vs_stock_tensorflow": 50.0,
    "p99_ms_8_clients": 25.0,
    # Issue 14: a scikit-learn pyfunc, this server vs stock, 8 clients.
    "vs_stock_sklearn": 3.0,
    "vs_echo": 0.40,
    # Issue 12: with the feature and prediction histograms recorded, at 8 clients.
    "vs_echo_8_clients": 0.55,
}


# -- the run -------------------------------------------------------------------------------------


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


def build_report(
    cells: dict[str, Cell], models: dict[str, Any], args: argparse.Namespace, took_s: float
) -> dict[str, Any]:
    conns = args.connections
    ours = cells["this-server"]

    def ratio(other: str, c: int, mine: str = "this-server") -> float | None:
        if other not in cells or c not in cells[other].results or mine not in cells:
            return None
        return cells[mine].results[c]["rps"] / cells[other].results[c]["rps"]

    header = ["server"]
    for c in conns:
        header += [f"req/s @{c}", f"p50 ms @{c}", f"p99 ms @{c}", f"CPU us/req @{c}"]
    header += ["RSS MB", "max abs diff vs stock"]
    rows = []
    for cell in cells.values():
        row = [cell.server]
        for c in conns:
            r = cell.results.get(c)
            if r:
                row += [f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
                row += [f"{r['cpu_us']:.0f}"]
            else:
                row += ["-"] * 4
        row += [f"{cell.rss_mb:.0f}", "-" if cell.max_diff is None else f"{cell.max_diff:.1e}"]
        rows.append(row)

    checks: list[tuple[str, str, str, bool]] = []
    top = max(conns)
    for c in conns:
        value = ratio("stock-pyfunc", c)
        if value is not None:
            name = f"{c} client(s): this server / stock-pyfunc throughput"
            target = TARGETS["vs_stock_same_version"]
            checks.append((name, f"{value:.1f}x", f">= {target:g}x", value >= target))
        value = ratio("echo", c)
        if value is not None:
            name = f"{c} client(s): this server / echo throughput"
            target = TARGETS["vs_echo_8_clients" if c >= 8 else "vs_echo"]
            checks.append((name, f"{value:.0%}", f">= {target:.0%}", value >= target))
    p99_target = TARGETS["p99_ms_8_clients"]
    for label in ("this-server", "this-server-tensorflow"):
        if label in cells and top in cells[label].results:
            p99 = cells[label].results[top]["p99_ms"]
            checks.append(
                (
                    f"p99 at {top} clients ({label})",
                    f"{p99:.2f} ms",
                    f"< {p99_target:g} ms",
                    p99 < p99_target,
                )
            )
    # Issue 14's targets: each model on this server vs stock on the same model.
    for mine, other, key in (
        ("this-server-tensorflow", "stock-tensorflow", "vs_stock_tensorflow"),
        ("this-server-sklearn", "stock-sklearn", "vs_stock_sklearn"),
    ):
        value = ratio(other, top, mine)
        if value is not None:
            name = f"{top} client(s): {mine} / {other} throughput"
            target = TARGETS[key]
            checks.append((name, f"{value:.1f}x", f">= {target:g}x", value >= target))
    predictions_ok = True
    for label, cell in cells.items():
        if not label.startswith("this-server") or "@" in label:
            continue
        diff = float("inf") if cell.max_diff is None else cell.max_diff
        predictions_ok = predictions_ok and diff <= ATOL
        reference = {"this-server-tensorflow": "stock-tensorflow"}.get(label, "stock-pyfunc")
        if "sklearn" in label:
            reference = "stock-sklearn"
        checks.append(
            (
                f"{label}'s predictions equal {reference}'s",
                f"max abs diff {diff:.1e}",
                f"<= {ATOL:g}",
                diff <= ATOL,
            )
        )
    errors = sum(r["errors"] for c in cells.values() for r in c.results.values())

    def table(head: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)

    check_rows = [[name, got, want, "met" if ok else "NOT met"] for name, got, want, ok in checks]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    command = "make bench-serving   # = .venv/bin/python scripts/bench_serving.py"
    baseline = getattr(args, "baseline_label", None)
    if baseline:
        command = f".venv/bin/python scripts/bench_serving.py --baseline {baseline.split('@')[1]}"
    md = "\n".join(
        [
            "## Model server (`python -m serving.server`) vs stock `mlflow models serve`",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {machine}; load generator `wrk` "
            f"(1 thread) on the same machine; single-row `dataframe_split` JSON POSTs; one "
            f"worker per server. All servers are started first (an idle server uses no CPU), "
            f"then measured one at a time in {args.rounds} interleaved rounds of "
            f"{args.duration} s per cell (after a {args.warmup} s warm-up each; each round "
            "starts one server further on); the tables show the median of the rounds.",
            "",
            "```",
            command,
            "```",
            "",
            table(header, rows),
            "",
            table(["target", "measured", "wanted", ""], check_rows),
            "",
            "- **echo**: a bare ASGI app on the same uvicorn/httptools/uvloop stack that parses "
            "the JSON body and answers a constant: the ceiling for this HTTP stack.",
            "- **stock-pyfunc**: `mlflow models serve --env-manager local` on the registered "
            f"pyfunc version (`{models['pyfunc_uri']}` in the benchmark's own store).",
            "- **stock-tensorflow**: the same network logged with `mlflow.tensorflow.log_model` "
            "(served through `keras.Model.predict`).",
            "- **this-server-tensorflow**: `python -m serving.server` on the plain "
            "`mlflow.tensorflow` copy (the Keras fast path for the tensorflow flavor, issue 14).",
            "- **stock-sklearn** / **this-server-sklearn**: a scikit-learn `Ridge` on the same "
            "columns, logged with `mlflow.sklearn.log_model`: stock, and this server "
            "(micro-batched `pyfunc.predict`, issue 14).",
            "- **this-server**: `python -m serving.server` on the same pyfunc version, default "
            f"settings (access log on, micro-batching on, {_keras_path_note()}, metrics kept by "
            "`prometheus_client` from per-request records applied in batches, the feature and "
            "prediction histograms included: every answered row, with the generic buckets, the "
            "benchmark's model having no drift profile).",
            "- CPU us/req: user + system CPU time of the server's whole process tree during a "
            "cell, divided by the requests answered (from `/proc`; it excludes the load "
            "generator, and moves less with machine load than req/s does).",
            "- RSS is the resident memory of the server's whole process tree after the runs.",
            *batching_note(ours, conns),
            *baseline_note(cells, baseline, conns),
            f"- Non-2xx or socket errors during the runs: {errors}.",
            f"- The load generator shares the {os.cpu_count()} CPUs with the server, and the "
            "machine may be shared with other jobs (1-minute load average "
            f"{args.load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after): the echo "
            "app, the fastest, is the most sensitive to that, so its ratio moves most between "
            "runs.",
            f"- The run took {took_s / 60:.1f} min.",
        ]
    )
    text = table(header, rows) + "\n\n" + table(["target", "measured", "wanted", ""], check_rows)
    return {"markdown": md, "text": text, "predictions_ok": predictions_ok}


def _keras_path_note() -> str:
    import importlib.util

    if importlib.util.find_spec("ai_edge_litert") is not None:
        # The pipeline's model carries a LiteRT artifact (ml/export.py): the slim path serves it.
        return "the slim path: the model's LiteRT artifact, no TensorFlow (issue 14)"
    return "the TensorFlow fast path (the LiteRT runtime is not installed)"


def baseline_note(cells: dict[str, Cell], baseline: str | None, conns: list[int]) -> list[str]:
    if not baseline or baseline not in cells:
        return []
    ours, before = cells["this-server"].results, cells[baseline].results
    parts = [
        f"{c} client(s): {ours[c]['rps'] / before[c]['rps']:.2f}x the throughput, "
        f"{ours[c]['cpu_us']:.0f} vs {before[c]['cpu_us']:.0f} CPU us/req"
        for c in conns
        if c in ours and c in before
    ]
    return [
        f"- **{baseline}**: the same server as of that revision, measured in the same rounds "
        "(what this run's code costs or saves against it, whatever the echo ceiling did): "
        "this-server at " + "; ".join(parts) + "."
    ]


def batching_note(ours: Cell, conns: list[int]) -> list[str]:
    parts = [
        f"{ours.results[c]['per_call']:.1f} at {c} client(s)"
        for c in conns
        if "per_call" in ours.results.get(c, {})
    ]
    if not parts:
        return []
    return [
        "- this-server's micro-batching, requests per model call (median of the rounds): "
        + ", ".join(parts)
        + "."
    ]


def write_doc(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between ``begin`` and ``end`` in docs/benchmarks.md (or append it)."""
    block = f"{begin}\n{section}\n{end}"
    if DOC.exists():
        text = DOC.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + block + tail
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "# Benchmarks\n\nNumbers, and the exact commands that made them.\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
