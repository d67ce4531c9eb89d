"""The tables, the targets' checks and the docs/benchmarks.md section of a run."""

from __future__ import annotations

import argparse
import os
import platform
from datetime import UTC, datetime
from typing import Any

from scripts.benchlib.rounds import Cell

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
