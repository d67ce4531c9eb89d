"""What a fresh Python process pays to import the project's heavy libraries, with the installed
modules' bytecode (what `scripts/bootstrap.sh` compiles) and without it (every module compiled
from source, what every process paid where PYTHONDONTWRITEBYTECODE=1 is set and the installer
wrote no bytecode).

    .venv/bin/python scripts/bench_imports.py [--rounds 3]

"Without" points ``PYTHONPYCACHEPREFIX`` at an empty folder and sets
``PYTHONDONTWRITEBYTECODE=1``: Python finds no bytecode there and writes none. Rounds
alternate the two modes; the figure is the median wall time of ``python -c 'import M'``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODULES = ("pandas", "mlflow", "airflow", "sklearn", "tensorflow")


def _import_seconds(module: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    base.pop("PYTHONPYCACHEPREFIX", None)
    with tempfile.TemporaryDirectory(prefix="no-bytecode-") as empty:
        modes = {"with bytecode": base, "from source": {**base, "PYTHONPYCACHEPREFIX": empty}}
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        print("| module | with bytecode s | from source s | saved |")
        print("|---|---|---|---|")
        for module in MODULES:
            samples: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode, env in modes.items():
                    samples[mode].append(_import_seconds(module, env))
            warm, cold = (statistics.median(samples[m]) for m in modes)
            print(
                f"| {module} | {warm:.2f} | {cold:.2f} | {cold - warm:.2f} s ({cold / warm:.1f}x) |"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
