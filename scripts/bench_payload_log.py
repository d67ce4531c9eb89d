"""What the payload log costs the model server: throughput with it off, at 10% and at 100%.

    .venv/bin/python scripts/bench_payload_log.py          # ~4 minutes; writes docs/benchmarks.md
    .venv/bin/python scripts/bench_payload_log.py --rounds 1 --duration 3 --no-write

Trains the project's regressor for a few epochs on the synthetic data in a throwaway SQLite
MLflow store, starts three ``python -m serving.server`` processes on it (one worker each:
``--payload-log-sample-percent`` 0, 10 and 100, the log in a temporary folder), and measures
them with ``wrk`` (single-row ``dataframe_split`` POSTs, 8 connections) in rounds that measure
the three back to back: what the log costs is the ratio within a round (throughput, and CPU
time per request of the server's processes), and the median of those ratios is kept, since a
shared machine's load moves between rounds far more than within one
(``scripts/benchlib``, the serving bench's helpers). Then it stops the
servers (their open files close) and checks that the rows on disk are the rows the servers
counted as written, and none dropped. Targets (issue 25): at 8 clients, 100% sampling keeps at
least 90% of the throughput with the log off, 10% sampling at least 97%.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from scripts.benchlib.doc import write_doc  # noqa: E402
from scripts.benchlib.proctree import tree_cpu_s  # noqa: E402
from scripts.benchlib.servers import Server, free_port, start_server, stop, wait_ready  # noqa: E402
from scripts.benchlib.wrk import WRK_LUA, run_wrk  # noqa: E402

BEGIN = "<!-- bench-payload-log:begin -->"
END = "<!-- bench-payload-log:end -->"
SAMPLES = (0.0, 10.0, 100.0)
TARGETS = {10.0: 0.97, 100.0: 0.90}
NOTES = """\
- CPU-bound throughput vs off: the server's CPU time per request with the log off over the
  same with it on (what throughput becomes when the server, not the client or the machine's
  other jobs, is the limit); req/s moves far more with a shared machine's load.
- What it took (same benchmark, earlier code): with the writer woken by every hand-over (4 to
  30 times a second), 10% sampling cost 15% of the CPU per request, about as much as 100%:
  each wake-up fights the event loop for the GIL. Woken once a second, 10% cost 4%, but 100%
  still 17%: the rows kept for the writer (three lists and a tuple per request) tripled the
  garbage collector's runs (1746 against 587 young-generation collections in one run). Rows
  packed into bytes (nothing the collector tracks) and Parquet's dictionary encoding on the
  version column only (on every column it took 0.25 s per 200k-row file, 10x the rest of the
  write) brought 100% to the numbers above; the writer thread itself uses about 1 us per row.
"""


def prepare_model(workdir: Path, epochs: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import pandas as pd

    from ml.schema import SYNTHETIC_FEATURES
    from ml.settings import DataSettings, TrainingSettings
    from ml.synthetic import synthetic_partition
    from ml.train import train_model

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.chdir(workdir)
    settings = DataSettings()
    days = pd.date_range("2024-03-01", periods=7).date
    frame = pd.concat([synthetic_partition(d, settings) for d in days], ignore_index=True)
    result = train_model(
        frame,
        SYNTHETIC_FEATURES,
        settings.target_column,
        TrainingSettings(epochs=epochs),
        experiment_name="bench-payload-log",
        run_name="bench-payload-log",
    )
    version = mlflow.register_model(result.model_uri, "bench-payload-log").version
    row = frame[SYNTHETIC_FEATURES].iloc[0].tolist()
    return {
        "tracking_uri": uri,
        "uri": f"models:/bench-payload-log/{version}",
        "body": {"dataframe_split": {"columns": SYNTHETIC_FEATURES, "data": [row]}},
    }


def payload_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    pattern = r'^model_server_payload_log_rows_total\{outcome="(\w+)"\} (\S+)$'
    found = re.findall(pattern, text, re.M)
    return {outcome: float(value) for outcome, value in found}


def rows_on_disk(folder: Path) -> int:
    import pandas as pd

    rows = 0
    for path in folder.glob("date=*/payload-*"):
        if path.suffix == ".parquet":
            rows += len(pd.read_parquet(path, columns=["row"]))
        else:
            rows += sum(1 for _ in path.open("rb"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured cell")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load first")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (median of ratios)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-payload-log-"))
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    model = prepare_model(workdir, args.epochs)
    lua = workdir / "post.lua"
    lua.write_text(WRK_LUA.format(body=json.dumps(model["body"])))
    servers: dict[float, Server] = {}
    rps: dict[float, list[float]] = {s: [] for s in SAMPLES}
    cpu: dict[float, list[float]] = {s: [] for s in SAMPLES}
    try:
        for sample in SAMPLES:
            port = free_port()
            cmd = [sys.executable, "-m", "serving.server", "--model-uri", model["uri"]]
            cmd += ["--port", str(port), "--no-access-log"]
            cmd += ["--payload-log-path", str(workdir / f"log-{sample:g}")]
            cmd += ["--payload-log-sample-percent", str(sample)]
            label = f"payload-log-{sample:g}"
            servers[sample] = start_server(label, cmd, port, model, workdir)
        for server in servers.values():
            wait_ready(server.proc, server.url, server.log_path)
            run_wrk(server.url, lua, args.connections, args.warmup)
        for round_ in range(args.rounds):
            order = SAMPLES[round_ % 3 :] + SAMPLES[: round_ % 3]
            for sample in order:
                server = servers[sample]
                before = tree_cpu_s(server.proc.pid)
                res = run_wrk(server.url, lua, args.connections, args.duration)
                rps[sample].append(res["rps"])
                used = tree_cpu_s(server.proc.pid) - before
                cpu[sample].append(used / max(1, res["requests"]) * 1e6)
                rate = f"{res['rps']:8.0f} req/s"
                print(f"round {round_ + 1} sample {sample:5g}%: {rate}", flush=True)
        time.sleep(1.5)  # the writers catch up with the last records
        counts = {s: payload_counts(servers[s].url) for s in SAMPLES}
    finally:
        for server in servers.values():
            stop(server.proc)
    on_disk = {s: rows_on_disk(workdir / f"log-{s:g}") for s in SAMPLES}

    # Each round measures the three servers back to back: the ratio within a round is what
    # the log costs; the machine's load moves between rounds, so the median of those ratios.
    def ratio(values: dict[float, list[float]], sample: float, invert: bool = False) -> float:
        pairs = zip(values[sample], values[0.0], strict=True)
        return statistics.median(b / a if invert else a / b for a, b in pairs)

    lines = [
        "| payload log | req/s @8 (median) | req/s vs off (median of rounds) | CPU us/req "
        "| CPU-bound throughput vs off | rows written | dropped | on disk |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    checks = []
    for sample in SAMPLES:
        written = counts[sample].get("written", 0.0)
        dropped = counts[sample].get("dropped", 0.0)
        by_rps, by_cpu = ratio(rps, sample), ratio(cpu, sample, invert=True)
        lines.append(
            f"| {'off' if not sample else f'{sample:g}%'} | {statistics.median(rps[sample]):.0f} "
            f"| {by_rps:.1%} | {statistics.median(cpu[sample]):.1f} | {by_cpu:.1%} "
            f"| {written:.0f} | {dropped:.0f} | {on_disk[sample]} |"
        )
        if sample in TARGETS:
            whole = on_disk[sample] == written and not dropped
            ok = min(by_rps, by_cpu) >= TARGETS[sample] and whole
            checks.append(
                f"- {sample:g}% sampling: {by_rps:.1%} of the throughput with the log off "
                f"({by_cpu:.1%} from CPU per request; wanted >= {TARGETS[sample]:.0%}); rows "
                f"on disk = rows counted written, none dropped: {'met' if ok else 'NOT met'}"
            )
    section = "\n".join(
        [
            "## Payload log cost (`python -m serving.server --payload-log-sample-percent`)",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} CPUs; three servers on "
            f"the same model version (one worker, access log off), single-row `dataframe_split` "
            f"POSTs from `wrk` at {args.connections} connections, {args.rounds} rounds of "
            f"{args.duration} s per cell (the three back to back, the order turning), the median "
            f"of the per-round ratios kept. 1-minute load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; the run took "
            f"{(time.monotonic() - started) / 60:.1f} min.",
            "",
            "```",
            ".venv/bin/python scripts/bench_payload_log.py",
            "```",
            "",
            *lines,
            "",
            *checks,
            *NOTES.splitlines(),
        ]
    )
    print("\n" + section)
    if not args.no_write:
        write_doc(section, BEGIN, END)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
