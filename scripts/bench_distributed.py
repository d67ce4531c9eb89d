"""One nightly run on the distributed shape next to the same run on the local stack.

    .venv/bin/python scripts/bench_distributed.py          # prints the table (needs root)

Each stack is `scripts/stack.py` in a state folder of its own (free ports, no Prometheus): the
local stack (`make run`), then `PIPELINE_EXECUTOR=celery` (docs/operations.md, "From one
machine to many"). On each: `up`, one `run` to warm it (the DAG's first unpause also runs its
nightly schedule), then the measured `run` with ``force_retrain`` and ``force_deploy`` (a
rollout every time): trigger to the end of ``rollout_local``, when ``@champion`` has moved.
Both stacks are measured in the same invocation, one after the other, so that the ratio
compares like with like on a shared machine (the 1-minute load average is printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = {"force_retrain": True, "force_deploy": True}
SHAPES = {"local stack": {}, "distributed (celery)": {"PIPELINE_EXECUTOR": "celery"}}
TASK = re.compile(r"\[stack\]\s+(\w+)\s+success\s+start\s+([\d.]+) s\s+took\s+([\d.]+) s")


def free_ports(n: int) -> list[str]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [str(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def stack(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stack.py"), *command],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(
            f"stack.py {command[0]} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def measure(extra: dict[str, str]) -> dict[str, tuple[float, float]]:
    """``{task: (start, took)}`` of the measured run, and ``"load"``."""
    state = Path(tempfile.mkdtemp(prefix="bench-distributed-", dir="/tmp"))
    names = ("MLFLOW_PORT", "AIRFLOW_PORT", "PIPELINE_PG_PORT", "PIPELINE_REDIS_PORT",
             "PIPELINE_OBJECT_STORE_PORT", "PIPELINE_DEPLOY_LOCAL_PORT")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    ports = free_ports(len(names) + 2)
    env |= dict(zip(names, ports, strict=False)) | extra
    env["PIPELINE_DEPLOY_LOCAL_SLOT_PORTS"] = ",".join(ports[-2:])
    env |= {"PIPELINE_STATE_DIR": str(state), "PROMETHEUS_BIN": "/nonexistent"}
    try:
        stack(["up"], env)
        stack(["run"], env)
        load = os.getloadavg()[0]
        out = stack(["run", "--conf", json.dumps(CONF)], env)
        tasks = {m[1]: (float(m[2]), float(m[3])) for m in TASK.finditer(out)}
        if "rollout_local" not in tasks:
            raise SystemExit(f"the measured run did not roll out:\n{out[-3000:]}")
        return tasks | {"load": (load, os.getloadavg()[0])}
    finally:
        stack(["down"], env)
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    results = {}
    for name, extra in SHAPES.items():
        print(f"measuring: {name}", flush=True)
        results[name] = measure(extra)
    rows = [t for t in results["local stack"] if t != "load"]
    print("\n| task | " + " | ".join(results) + " |\n|---|---|---|")
    for task in rows:
        cells = [f"{r[task][1]:.1f} s" if task in r else "-" for r in results.values()]
        print(f"| {task} | " + " | ".join(cells) + " |")
    ends = [sum(r["rollout_local"]) for r in results.values()]
    print(f"| **trigger to @champion moved** | {ends[0]:.1f} s | {ends[1]:.1f} s |")
    loads = [f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" for r in results.values()]
    print(f"| load 1m | {loads[0]} | {loads[1]} |")
    print(f"\ndistributed / local: {ends[1] / ends[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
