"""CPU time and resident memory of a server's whole process tree (its session), from /proc."""

from __future__ import annotations

import os
from pathlib import Path


def _session_procs(session_id: int):
    """(pid, fields of /proc/<pid>/stat after the command name) of the session's processes."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
            fields = raw[raw.rfind(")") + 2 :].split()
            if int(fields[3]) == session_id:  # field 6 of stat: session id
                yield entry.name, fields
        except (OSError, ValueError, IndexError):
            continue


def tree_rss_mb(session_id: int) -> float:
    """Resident memory of every process in the server's session (stock forks uvicorn)."""
    total_kb = 0
    for pid, _ in _session_procs(session_id):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total_kb / 1024.0


def tree_cpu_s(session_id: int) -> float:
    """CPU seconds (user + system) used so far by the processes of the server's session."""
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _session_procs(session_id))  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")
