"""The measurement: every server checked, warmed up, then measured in interleaved rounds."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.benchlib.parity import predictions, reference_of
from scripts.benchlib.proctree import tree_cpu_s, tree_rss_mb
from scripts.benchlib.servers import Server, wait_ready
from scripts.benchlib.wrk import run_wrk


@dataclass
class Cell:
    server: str
    rounds: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    rss_mb: float = 0.0
    ready_s: float = 0.0
    max_diff: float | None = None

    @property
    def results(self) -> dict[int, dict[str, float]]:
        """Per client count: the median over rounds of each number (errors: the sum)."""
        out = {}
        for connections, runs in self.rounds.items():
            out[connections] = {
                key: statistics.median(r[key] for r in runs)
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us")
            }
            out[connections]["errors"] = sum(r["errors"] for r in runs)
            per_call = [r["per_call"] for r in runs if "per_call" in r]
            if per_call:
                out[connections]["per_call"] = statistics.median(per_call)
        return out


def batch_counts(server: Server) -> tuple[float, float] | None:
    """(requests, model calls) of the micro-batcher so far, for this server only."""
    if not server.label.startswith("this-server"):
        return None
    import re

    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = [
        re.search(rf"^model_server_batch_requests_{key} (\S+)$", text, re.M)
        for key in ("sum", "count")
    ]
    if not all(found):
        return None
    return float(found[0].group(1)), float(found[1].group(1))


def run_benchmark(
    servers: list[Server], models: dict[str, Any], lua: Path, args: argparse.Namespace
) -> dict[str, Cell]:
    """All servers up (idle ones use no CPU); cells measured in interleaved rounds."""
    cells = {s.label: Cell(s.label) for s in servers}
    for server in servers:
        cells[server.label].ready_s = wait_ready(server.proc, server.url, server.log_path)
    by_label = {s.label: s for s in servers}
    answers: dict[str, list[float]] = {}

    def answer(label: str) -> list[float]:
        if label not in answers:
            answers[label] = predictions(
                by_label[label].url, models["columns"], models["check_rows"]
            )
        return answers[label]

    for server in servers[1:]:
        reference = reference_of(server.label, by_label)
        if reference is None:
            continue
        pairs = zip(answer(server.label), answer(reference), strict=True)
        cells[server.label].max_diff = max(abs(a - b) for a, b in pairs)
    for server in servers:
        run_wrk(server.url, lua, 8, args.warmup)  # warm-up, not recorded
    for round_ in range(1, args.rounds + 1):
        print(f"\n-- round {round_}/{args.rounds}", flush=True)
        # Each round starts one server further on: no server always follows the same one
        # (the one measured right after stock MLflow's heavy cells runs a little slower).
        shift = (round_ - 1) % len(servers)
        for server in servers[shift:] + servers[:shift]:
            for connections in args.connections:
                before = batch_counts(server)
                cpu_before = tree_cpu_s(server.proc.pid)
                res = run_wrk(server.url, lua, connections, args.duration)
                cpu = tree_cpu_s(server.proc.pid) - cpu_before
                res["cpu_us"] = cpu / max(1, res["requests"]) * 1e6
                after = batch_counts(server)
                if before and after and after[1] > before[1]:
                    res["per_call"] = (after[0] - before[0]) / (after[1] - before[1])
                cells[server.label].rounds.setdefault(connections, []).append(res)
                per_call = f"  {res['per_call']:.1f} req/model call" if "per_call" in res else ""
                print(
                    f"   {server.label:17s} c={connections}: {res['rps']:8.0f} req/s  "
                    f"p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms  "
                    f"CPU {res['cpu_us']:6.1f} us/req  errors {res['errors']}{per_call}",
                    flush=True,
                )
    for server in servers:
        cells[server.label].rss_mb = tree_rss_mb(server.proc.pid)
    return cells
