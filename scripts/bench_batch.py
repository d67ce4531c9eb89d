"""Batch scoring at volume: ``score_batch``'s scoring step on 1M and 10M rows.

    .venv/bin/python scripts/bench_batch.py              # ~5 minutes the first time; writes docs
    .venv/bin/python scripts/bench_batch.py --sizes 1m --no-write

The windows are ``scripts/bench_train.py``'s (7 days of synthetic partitions, files of at most
1M rows, cached under ``.local/bench-train/``). A model is trained for 2 epochs and registered
in a throwaway SQLite MLflow store. For each size, one process does what the ``score`` task
does (``serving.deploy.batch``: the model server's loader gives the compiled prediction path,
the window is streamed and every prediction written), and its wall time and peak RSS (the
kernel's high-water mark, ``wait4``, as bench_train measures it) are kept. Targets (issue 25):
at least 1M rows per minute, and the peak RSS at 10M within 20% of the peak at 1M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_train

from scripts.benchlib.doc import write_doc

BEGIN = "<!-- bench-batch:begin -->"
END = "<!-- bench-batch:end -->"
TARGET_ROWS_PER_MIN = 1_000_000
TARGET_RSS_GROWTH = 0.20
# What the score task does, in its own process: argv = model uri, data root, output, end.
STEP = """import json, sys
from datetime import date
from ml.pipeline import load_window
from ml.settings import DataSettings
from serving.deploy.batch import compiled, score_window
uri, root, out, end = sys.argv[1:5]
settings = DataSettings(source="files", path=root, window_days=7)
window = load_window(settings, date.fromisoformat(end))
predict, columns, path = compiled(uri)
summary = score_window({"version": "1", "model_uri": uri}, window, predict, columns,
                       data_settings=settings, predictions_path=out)
print(json.dumps(summary | {"serving_path": path}))
"""


def train_model(workdir: Path) -> str:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import pandas as pd

    from ml.schema import SYNTHETIC_FEATURES
    from ml.settings import DataSettings, TrainingSettings
    from ml.synthetic import synthetic_partition
    from ml.train import train_model as train

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    os.chdir(workdir)
    settings = DataSettings()
    days = pd.date_range("2024-03-01", periods=7).date
    frame = pd.concat([synthetic_partition(d, settings) for d in days], ignore_index=True)
    result = train(
        frame,
        SYNTHETIC_FEATURES,
        settings.target_column,
        TrainingSettings(epochs=2),
        experiment_name="bench-batch",
        run_name="bench-batch",
    )
    return f"models:/bench-batch/{mlflow.register_model(result.model_uri, 'bench-batch').version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1m,10m", type=lambda t: t.split(","))
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    sizes = [bench_train.parse_size(s) for s in args.sizes]
    data = {rows: bench_train.ensure_data(rows) for rows in sizes}
    workdir = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    load_before = os.getloadavg()[0]
    model_uri = train_model(workdir)
    env = dict(os.environ, PYTHONPATH=str(bench_train.REPO), TF_CPP_MIN_LOG_LEVEL="2")
    results = {}
    for rows in sizes:
        out = workdir / f"predictions-{bench_train.label(rows)}"
        end = bench_train.WINDOW_END.isoformat()
        argv = [sys.executable, "-c", STEP, model_uri, str(data[rows]), str(out), end]
        measured = bench_train.run_process(argv, env, workdir, workdir / "step.log")
        if measured["rc"] != 0:
            print((workdir / "step.log").read_text()[-3000:], file=sys.stderr)
            return 1
        summary = json.loads(measured["stdout"].strip().splitlines()[-1])
        assert summary["rows"] == rows, summary
        results[rows] = measured | {"summary": summary, "load": os.getloadavg()[0]}
        per_min = rows / measured["wall_s"] * 60
        print(
            f"{bench_train.label(rows)}: {measured['wall_s']:.1f} s ({per_min:,.0f} rows/min, "
            f"scoring alone {summary['rows_per_s'] * 60:,.0f}), peak RSS "
            f"{measured['rss_mb']:.0f} MB, {summary['serving_path']}",
            flush=True,
        )
    lines = [
        "| rows | wall s (whole process) | rows/min (whole process) | rows/min (scoring loop) "
        "| peak RSS MB | load avg |",
        "|---|---|---|---|---|---|",
    ]
    for rows, r in results.items():
        lines.append(
            f"| {bench_train.label(rows)} | {r['wall_s']:.1f} | {rows / r['wall_s'] * 60:,.0f} "
            f"| {r['summary']['rows_per_s'] * 60:,.0f} | {r['rss_mb']:,.0f} | {r['load']:.1f} |"
        )
    checks = []
    for rows, r in results.items():
        per_min = rows / r["wall_s"] * 60
        ok = "met" if per_min >= TARGET_ROWS_PER_MIN else "NOT met"
        checks.append(f"- {bench_train.label(rows)} rows at {per_min:,.0f} rows/min: {ok}")
    if len(results) > 1:
        small, large = results[min(results)], results[max(results)]
        growth = large["rss_mb"] / small["rss_mb"] - 1
        ok = "met" if growth <= TARGET_RSS_GROWTH else "NOT met"
        checks.append(
            f"- peak RSS from {bench_train.label(min(results))} to "
            f"{bench_train.label(max(results))} rows: {growth:+.1%} (wanted within "
            f"{TARGET_RSS_GROWTH:.0%}): {ok}"
        )
    path = next(iter(results.values()))["summary"]["serving_path"]
    section = "\n".join(
        [
            "## Batch scoring at volume (`score_batch`'s score step)",
            "",
            f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} CPUs (1-minute load "
            f"average {load_before:.1f} before). One process per size does what the `score` "
            "task does: the model server's loader gives the compiled prediction path "
            f"(`{path}` for the pipeline's model), the 7-day window of parquet partitions "
            "(`scripts/bench_train.py`'s, files of at most 1M rows) is streamed 65,536 rows at "
            "a time, and every prediction is written (one parquet file per input file). Wall "
            "time includes the interpreter, the model load and the writes; peak RSS is the "
            "process's high-water mark.",
            "",
            "```",
            ".venv/bin/python scripts/bench_batch.py",
            "```",
            "",
            *lines,
            "",
            *checks,
        ]
    )
    print("\n" + section)
    if not args.no_write:
        write_doc(section, BEGIN, END)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
