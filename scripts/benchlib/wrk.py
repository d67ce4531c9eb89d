"""The load generator: ``wrk`` with a Lua script that POSTs one body and reports JSON."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# wrk's summary as one JSON line, for ``str.format`` templates (braces doubled); the benches
# that run wrk (bench_serving, bench_rollout) read it.
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"status_errors": %d, "socket_errors": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""
WRK_LUA = (
    """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]"""
    + WRK_DONE
)


def run_wrk(url: str, lua: Path, connections: int, duration_s: int) -> dict[str, float]:
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
        "-s", str(lua), f"{url}/invocations",
    ]  # fmt: skip
    completed = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True
    )
    line = next(ln for ln in completed.stdout.splitlines() if ln.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON ") :])
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000.0,
        "p99_ms": raw["p99_us"] / 1000.0,
        "requests": raw["requests"],
        "errors": raw["status_errors"] + raw["socket_errors"],
    }
