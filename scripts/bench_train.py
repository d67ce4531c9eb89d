"""Training at volume: validate, train and evaluate on 10k to 50M rows, against the hardware.

    make bench-train                                   # all four sizes; writes docs/benchmarks.md
    .venv/bin/python scripts/bench_train.py --sizes 10k,1m --epochs 2 --no-write   # a quick run
    .venv/bin/python scripts/bench_train.py --sizes 10m --object-store   # folder vs s3://

Per size, a 7-day window of synthetic parquet partitions is cached under ``.local/bench-train/``;
each step runs as ``python -m ml <step>`` in its own process (as a pod or a task would) against
a throwaway SQLite MLflow store. Per step: wall time and peak RSS (``wait4``); for ``train`` the
fit's row-epochs/s (the run's ``fit_rows`` x ``epochs_run`` / ``fit_seconds``) against the
ceiling: the same network fitted by a bare ``model.fit`` on in-memory tensors, in its own
process. Rewrites the ``## Training at volume`` section of ``docs/benchmarks.md``. With
``--object-store``, only ``window`` and ``train`` run, twice per size: on the cached folder and
on the same files in a MinIO of its own (scripts/objectstore, ``s3://bench/...``); the section
``## Training from the object store`` gets both throughputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".local" / "bench-train"
DOC = REPO / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-train:begin -->"
END = "<!-- bench-train:end -->"
WINDOW_END = date(2026, 3, 8)
WINDOW_DAYS = 7
FILE_ROWS = 1_000_000  # rows per partition file at most (several files per day beyond)
CEILING_ROWS = 1_000_000  # the bare loop's rows: its speed per row does not depend on more
STEPS = ("window", "validate", "train", "evaluate")
# Each size's result is appended here as soon as it is measured (--report-only renders them).
RESULTS = CACHE / "results.jsonl"
TARGET_RSS_MB = 2048
TARGET_ROW_EPOCHS = 500_000
TARGET_CEILING_SHARE = 0.70


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10k, 1m, 50m)") from None
    if value < 1_000:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1k rows (7 days of >= 50 rows)")
    return value


def label(rows: int) -> str:
    if rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows % 1_000 == 0:
        return f"{rows // 1_000}k"
    return str(rows)


def ensure_data(rows: int) -> Path:
    """The cached window of ``rows`` synthetic rows (written on first use)."""
    from ml.settings import DataSettings
    from ml.synthetic import synthetic_partition

    root = CACHE / f"rows-{label(rows)}"
    marker = root / "_COMPLETE.json"  # underscore: never read as a partition
    if marker.exists() and json.loads(marker.read_text()).get("rows") == rows:
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    days = [WINDOW_END - timedelta(days=WINDOW_DAYS - i) for i in range(WINDOW_DAYS)]
    per_day = [rows // WINDOW_DAYS + (1 if i < rows % WINDOW_DAYS else 0) for i in range(7)]
    for day, day_rows in zip(days, per_day, strict=True):
        folder = root / f"date={day.isoformat()}"
        folder.mkdir(parents=True)
        part = 0
        while day_rows > 0:
            n = min(FILE_ROWS, day_rows)
            # Each file from its own date's seed, so the files of one day are different rows.
            source_day = day - timedelta(days=WINDOW_DAYS * part)
            settings = DataSettings(synthetic_rows_per_day=n, path=str(root))
            frame = synthetic_partition(source_day, settings)
            frame.to_parquet(folder / f"part-{part:03d}.parquet", index=False)
            day_rows -= n
            part += 1
    marker.write_text(json.dumps({"rows": rows, "written": datetime.now(UTC).isoformat()}))
    print(f"  wrote {label(rows)} rows under {root} in {time.perf_counter() - started:.0f} s")
    return root


# Forks and execs the step, waits for it and writes its peak RSS (KiB) to the file in argv[1].
# A small process in between because Linux keeps the hiwater mark of the memory a process
# had before exec: a step forked straight from this (larger) process would report at least
# this process's size.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_process(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict:
    """Run ``argv``; wall time, peak RSS (MB) of the process, exit code and stdout."""
    started = time.perf_counter()
    rss_file = cwd / ".peak_rss"
    launcher = [sys.executable, "-S", "-c", LAUNCHER, str(rss_file)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*launcher, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=err
        )
        out = proc.stdout.read()
        proc.wait()
    # ru_maxrss: KiB on Linux, the step process's own peak.
    rss_mb = int(rss_file.read_text()) / 1024 if rss_file.exists() else 0.0
    wall_s = time.perf_counter() - started
    return {"wall_s": wall_s, "rss_mb": rss_mb, "rc": proc.returncode,
            "stdout": out.decode(errors="replace")}  # fmt: skip


def step_env(data_path: Path, store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        PIPELINE_DATA_SOURCE="files",
        PIPELINE_DATA_PATH=str(data_path),
        PIPELINE_DATA_WINDOW_DAYS=str(WINDOW_DAYS),
        PIPELINE_REGISTRY_MODEL_NAME="bench-train",
        PIPELINE_REGISTRY_EXPERIMENT_NAME="bench-train",
        MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def bench_size(rows: int, args: argparse.Namespace) -> dict:
    data_path = ensure_data(rows)
    work = Path(tempfile.mkdtemp(prefix=f"bench-train-{label(rows)}-"))
    env = step_env(data_path, work)
    log = work / "steps.log"
    ml = [sys.executable, "-m", "ml"]
    argv = {
        "window": [*ml, "window", "--end", WINDOW_END.isoformat(), "--output", "window.json"],
        "validate": [*ml, "validate", "--window", "window.json"],
        "train": [
            *ml,
            *("train", "--window", "window.json", "--epochs", str(args.epochs)),
            *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
            *("--output", "trained.json"),
        ],
        "evaluate": [
            *ml,
            *("evaluate", "--window", "window.json", "--trained", "trained.json"),
            *("--output", "evaluation.json"),
        ],
    }
    result: dict = {"rows": rows, "load_before": os.getloadavg()[0], "steps": {}}
    for step in [s for s in STEPS if s == "window" or s in args.steps]:
        print(f"  {label(rows)} {step} ...", flush=True)
        measured = run_process(argv[step], env, work, log)
        if measured["rc"] != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            measured["error"] = f"exit {measured['rc']}: " + " | ".join(tail)[-300:]
            print(f"    failed: {measured['error']}")
            result["steps"][step] = measured
            break
        result["steps"][step] = measured
        print(f"    {measured['wall_s']:.1f} s, peak RSS {measured['rss_mb']:.0f} MB")
    trained = work / "trained.json"
    if trained.exists():
        result["train"] = fit_figures(json.loads(trained.read_text()), env)
        result["ceiling"] = ceiling(result["train"], args, env, work, log)
    evaluation = work / "evaluation.json"
    if evaluation.exists():
        result["holdout"] = json.loads(evaluation.read_text())["candidate"]
        result["holdout_rows"] = json.loads(evaluation.read_text())["holdout_rows"]
    result["load_after"] = os.getloadavg()[0]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def fit_figures(trained: dict, env: dict[str, str]) -> dict:
    from mlflow import MlflowClient

    run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(trained["run_id"])
    metrics, params = run.data.metrics, run.data.params
    rows = int(metrics["fit_rows"])
    epochs = int(metrics["epochs_run"])
    seconds = float(metrics["fit_seconds"])
    return {
        "fit_rows": rows,
        "epochs": epochs,
        "fit_seconds": seconds,
        "row_epochs_per_s": rows * epochs / seconds,
        "batch_size": int(params.get("effective_batch_size", params["batch_size"])),
        "learning_rate": float(params.get("effective_learning_rate", params["learning_rate"])),
        "best_val_rmse": float(metrics["best_val_rmse"]),
    }


def ceiling(train: dict, args, env, work: Path, log: Path) -> dict:
    rows = min(train["fit_rows"], CEILING_ROWS)
    argv = [sys.executable, str(Path(__file__).resolve()), "--ceiling-rows", str(rows),
            "--ceiling-batch", str(train["batch_size"])]  # fmt: skip
    print(f"  ceiling: bare model.fit, {rows} rows, batch {train['batch_size']} ...", flush=True)
    measured = run_process(argv, env, work, log)
    if measured["rc"] != 0:
        return {"error": f"exit {measured['rc']}"}
    figures = json.loads(measured["stdout"].strip().splitlines()[-1])
    print(f"    {figures['row_epochs_per_s']:,.0f} row-epochs/s")
    return figures


def bare_loop(rows: int, batch_size: int) -> dict:
    """The same network, ``model.fit`` on in-memory float32 tensors: this machine's ceiling."""
    import numpy as np

    from ml.model import build_model, set_global_determinism
    from ml.settings import TrainingSettings

    settings = TrainingSettings()
    set_global_determinism(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 6)).astype("float32")
    y = (x @ rng.normal(size=6) + rng.normal(size=rows)).astype("float32")
    model = build_model(6, settings.hidden_units, settings.learning_rate, feature_mean=np.zeros(6),
                        feature_variance=np.ones(6), target_mean=0.0, target_std=1.0)  # fmt: skip
    # Warm-up (tracing the train step) outside the timed epoch.
    warm = min(rows, batch_size * 20)
    model.fit(x[:warm], y[:warm], batch_size=batch_size, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
    seconds = time.perf_counter() - started
    return {"rows": rows, "batch_size": batch_size, "row_epochs_per_s": rows / seconds}


def _mb(step: dict | None) -> str:
    return f"{step['rss_mb']:,.0f}" if step and "error" not in step else "-"


def table(results: list[dict]) -> list[str]:
    lines = [
        "| rows | window s | validate s | validate MB | train s | train MB | evaluate s "
        "| evaluate MB | batch | train row-epochs/s | bare loop row-epochs/s | of bare loop "
        "| holdout RMSE | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        steps = r["steps"]

        def wall(name, steps=steps):
            s = steps.get(name)
            if s is None:
                return "not run"
            return "failed" if "error" in s else f"{s['wall_s']:.1f}"

        train, top = r.get("train"), r.get("ceiling") or {}
        speed = f"{train['row_epochs_per_s']:,.0f}" if train else "-"
        bare = f"{top['row_epochs_per_s']:,.0f}" if "row_epochs_per_s" in top else "-"
        share = "-"
        if train and "row_epochs_per_s" in top:
            share = f"{train['row_epochs_per_s'] / top['row_epochs_per_s']:.0%}"
        rmse = f"{r['holdout']['rmse']:.3f}" if "holdout" in r else "-"
        lines.append(
            f"| {label(r['rows'])} | {wall('window')} | {wall('validate')} "
            f"| {_mb(steps.get('validate'))} | {wall('train')} | {_mb(steps.get('train'))} "
            f"| {wall('evaluate')} | {_mb(steps.get('evaluate'))} "
            f"| {train['batch_size'] if train else '-'} | {speed} | {bare} | {share} | {rmse} "
            f"| {r['load_before']:.1f}-{r['load_after']:.1f} |"
        )
    return lines


def targets(results: list[dict]) -> list[str]:
    by_rows = {r["rows"]: r for r in results}
    lines = ["| target | measured | wanted |  |", "|---|---|---|---|"]

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "not met")

    big = by_rows.get(50_000_000)
    for step in ("validate", "train", "evaluate"):
        s = big["steps"].get(step) if big else None
        ok = None if not s or "error" in s else s["rss_mb"] <= TARGET_RSS_MB
        measured = "-" if ok is None else f"{s['rss_mb']:,.0f} MB"
        lines.append(
            f"| peak RSS of {step} at 50M rows | {measured} | <= {TARGET_RSS_MB} MB "
            f"| {verdict(ok)} |"
        )
    for step in ("validate", "train", "evaluate"):
        sizes = sorted(
            (rows, r["steps"][step]["rss_mb"])
            for rows, r in by_rows.items()
            if rows >= 1_000_000 and step in r["steps"] and "error" not in r["steps"][step]
        )
        ok = None if len(sizes) < 2 else sizes[-1][1] <= 1.25 * sizes[0][1]
        measured = " / ".join(f"{label(n)} {mb:,.0f}" for n, mb in sizes) or "-"
        lines.append(
            f"| peak RSS of {step} flat from 1M rows on (MB) | {measured} "
            f"| largest <= 1.25x the 1M figure | {verdict(ok)} |"
        )
    ten = by_rows.get(10_000_000)
    train = ten.get("train") if ten else None
    top = (ten.get("ceiling") or {}) if ten else {}
    speed = train["row_epochs_per_s"] if train else None
    ok = None if speed is None else speed >= TARGET_ROW_EPOCHS
    measured = "-" if speed is None else f"{speed:,.0f} row-epochs/s"
    lines.append(
        f"| train throughput at 10M rows | {measured} "
        f"| >= {TARGET_ROW_EPOCHS:,} row-epochs/s | {verdict(ok)} |"
    )
    bare = top.get("row_epochs_per_s")
    share = speed / bare if speed is not None and bare else None
    measured = "-" if share is None else f"{share:.0%}"
    lines.append(
        f"| train throughput at 10M rows / bare loop | {measured} "
        f"| >= {TARGET_CEILING_SHARE:.0%} "
        f"| {verdict(None if share is None else share >= TARGET_CEILING_SHARE)} |"
    )
    return lines


def report(results: list[dict], args, minutes: float) -> str:
    sizes = ",".join(label(r["rows"]).lower() for r in results)
    command = "make bench-train   # = .venv/bin/python scripts/bench_train.py"
    if sizes != "10k,1m,10m,50m" or args.epochs != 3:
        command = f".venv/bin/python scripts/bench_train.py --sizes {sizes} --epochs {args.epochs}"
    lines = [
        "## Training at volume",
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; synthetic 7-day windows (parquet, files of at "
        f"most {FILE_ROWS:,} rows), {args.epochs} epochs, each step as `python -m ml <step>` "
        "in its own process against a SQLite MLflow store.",
        "",
        "```",
        command,
        "```",
        "",
        *table(results),
        "",
        *targets(results),
        "",
        "- window / validate / train / evaluate s: wall time of the step's process (imports, "
        "MLflow logging and model saving included); MB: its peak RSS (the kernel's "
        "high-water mark of the step's own process, `wait4` in a small launcher).",
        "- train row-epochs/s: rows fitted per epoch x epochs / seconds in the fit itself "
        "(the run's `fit_rows`, `epochs_run`, `fit_seconds`).",
        f"- bare loop: the same network (`ml.model.build_model`), `model.fit` on in-memory "
        f"float32 tensors ({CEILING_ROWS:,} rows at most, one timed epoch after a warm-up) "
        "with the batch size the run used, in its own process: the ceiling on this machine.",
        "- load 1m: the 1-minute load average before and after the size (the machine is "
        f"shared: read the shape, not the digits). The run took {minutes:.1f} min.",
    ]
    return "\n".join(lines)


def store_comparison(rows: int, args: argparse.Namespace) -> dict:
    """row-epochs/s of ``train`` on the folder and on the same files in a MinIO of its own."""
    sys.path.insert(0, str(REPO))  # this checkout's scripts/
    from scripts.stacklib.objectstore import ObjectStore
    from serving.deploy.local import wait_for

    folder, root = ensure_data(rows), Path(tempfile.mkdtemp(prefix="bench-store-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        store = ObjectStore(root, sock.getsockname()[1])
    server = store.start(root / "minio.log")
    try:
        assert wait_for(store.ready, 60, 0.2), (root / "minio.log").read_text()[-2000:]
        store.ensure_bucket("bench")
        for file in sorted(folder.glob("date=*/*.parquet")):
            store.client().upload_file(
                str(file), "bench", f"{folder.name}/{file.relative_to(folder)}"
            )
        sources = {"folder": (folder, {}), "object store": (f"s3://bench/{folder.name}", store)}
        result = {"rows": rows, "load_before": os.getloadavg()[0], "folder": [], "object store": []}
        # Interleaved, twice: the best of each is what another job on the machine spoiled least.
        for where, (path, s3) in [*sources.items(), *sources.items()]:
            work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=root))
            env = step_env(path, work) | (s3.client_env() if s3 else {})
            ml = [sys.executable, "-m", "ml"]
            for argv in (
                [*ml, "window", "--end", WINDOW_END.isoformat(), "--output", "window.json"],
                [*ml, "train", "--window", "window.json", "--epochs", str(args.epochs),
                 "--output", "trained.json"],
            ):  # fmt: skip
                done = run_process(argv, env, work, work / "steps.log")
                tail = (work / "steps.log").read_text()[-2000:]
                assert done["rc"] == 0, f"{where}: {' '.join(argv[2:4])} failed:\n{tail}"
            fit = fit_figures(json.loads((work / "trained.json").read_text()), env)
            result[where].append(fit["row_epochs_per_s"])
            print(f"    {where}: {fit['row_epochs_per_s']:,.0f} row-epochs/s", flush=True)
        return result | {"load_after": os.getloadavg()[0]}
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def store_report(results: list[dict], args) -> str:
    sizes = ",".join(label(r["rows"]).lower() for r in results)
    lines = [
        "## Training from the object store",
        "",
        f"Measured {date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} CPUs: "
        f"`train` ({args.epochs} epochs, `python -m ml train`) on the same synthetic window "
        "from the folder and from a MinIO on this machine, interleaved, twice each "
        "(scripts/objectstore, loopback: the "
        "S3 protocol and s3fs, not a network, are what is measured).",
        "",
        "```",
        f".venv/bin/python scripts/bench_train.py --sizes {sizes} --epochs {args.epochs} "
        "--object-store",
        "```",
        "",
        "| rows | folder row-epochs/s | object store row-epochs/s | object store / folder "
        "(best of each) | wanted | load 1m |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        local, remote = max(r["folder"]), max(r["object store"])
        each = {w: " / ".join(f"{v:,.0f}" for v in r[w]) for w in ("folder", "object store")}
        lines.append(
            f"| {label(r['rows'])} | {each['folder']} | {each['object store']} "
            f"| {remote / local:.0%} "
            f"| >= 80% ({'met' if remote >= 0.8 * local else 'not met'}) "
            f"| {r['load_before']:.1f}-{r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def write_doc(section: str, begin: str = BEGIN, end: str = END) -> None:
    """This bench's section of docs/benchmarks.md, the others kept (scripts/benchlib/doc.py)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # this checkout's scripts/
    from scripts.benchlib.doc import write_doc as write_section

    write_section(section, begin, end)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = "comma-separated row counts (10k, 1m, ...); default %(default)s"
    parser.add_argument("--sizes", default="10k,1m,10m,50m", help=what)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--batch-size", type=int, help="pass --batch-size to the train step")
    parser.add_argument(
        "--steps",
        default="validate,train,evaluate",
        type=lambda text: [s.strip() for s in text.split(",") if s.strip()],
        help="steps to measure after `window` (default %(default)s); the report keeps each "
        "step's latest measurement per size",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--object-store",
        action="store_true",
        help="train on the folder and on the same files in a MinIO (scripts/objectstore)",
    )
    parser.add_argument("--keep", action="store_true", help="keep each size's MLflow store")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help=f"measure nothing: render the results saved in {RESULTS.relative_to(REPO)} "
        "(the last measurement of each size)",
    )
    parser.add_argument("--ceiling-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ceiling_rows:
        print(json.dumps(bare_loop(args.ceiling_rows, args.ceiling_batch)))
        return 0

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if args.object_store:
        section = store_report([store_comparison(rows, args) for rows in sizes], args)
        print(f"\n{section}")
        if not args.no_write:
            write_doc(section, "<!-- bench-train-store:begin -->", "<!-- bench-train-store:end -->")
        return 0
    started = time.perf_counter()
    results = []
    if args.report_only:
        saved: dict[int, dict] = {}
        minutes = 0.0
        for line in RESULTS.read_text().splitlines():
            entry = json.loads(line)
            result = entry["result"]
            if entry["epochs"] != args.epochs or result["rows"] not in sizes:
                continue
            merged = saved.setdefault(result["rows"], {"steps": {}})
            # Each step's latest measurement; training figures with the train step's.
            merged["steps"].update(result["steps"])
            for key in ("rows", "load_before", "load_after", "train", "ceiling", "holdout"):
                if key in result and ("train" in result or key not in merged):
                    merged[key] = result[key]
            minutes += entry["minutes"]
        results = [saved[rows] for rows in sizes if rows in saved]
    else:
        for rows in sizes:
            print(f"{label(rows)} rows (load average {os.getloadavg()[0]:.1f})", flush=True)
            size_started = time.perf_counter()
            result = bench_size(rows, args)
            results.append(result)
            minutes = (time.perf_counter() - size_started) / 60
            entry = {"epochs": args.epochs, "minutes": minutes, "result": result}
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as out:
                out.write(json.dumps(entry, default=str) + "\n")
            if "train" in result:
                print(f"    train: {json.dumps(result['train'])}", flush=True)
        minutes = (time.perf_counter() - started) / 60
    section = report(results, args, minutes)
    print()
    print(section)
    if not args.no_write:
        write_doc(section)
        print(f"\nwrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
