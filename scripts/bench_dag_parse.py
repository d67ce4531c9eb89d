"""How long the DAG processor spends parsing each DAG file (what every parse loop pays).

    .venv/bin/python scripts/bench_dag_parse.py [--repeat 20]

Airflow, the providers and the DAG's light imports are warmed up first, as in a long-running
DAG processor; each repeat then re-executes the DAG file from scratch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "dags"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-bench-"))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    sys.path.append(str(DAGS))
    from airflow.dag_processing.dagbag import DagBag

    for dag_file in sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_")):
        DagBag(dag_folder=str(dag_file))  # warm-up: first-time imports
        samples = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            bag = DagBag(dag_folder=str(dag_file))
            samples.append((time.perf_counter() - start) * 1000)
            assert not bag.import_errors, bag.import_errors
        heavy = [m for m in ("tensorflow", "keras", "mlflow", "pandas") if m in sys.modules]
        print(f"{dag_file.name}: median {statistics.median(samples):.1f} ms, max "
              f"{max(samples):.1f} ms over {args.repeat} parses; heavy modules imported: "
              f"{heavy or 'none'}")  # fmt: skip


if __name__ == "__main__":
    main()
