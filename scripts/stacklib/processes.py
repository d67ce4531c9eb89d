"""The stack's processes and files: one lock per state folder, every process of that folder
found (psutil) and stopped whatever pid files say, and files only their owner may read.

Each process the stack starts carries ``PIPELINE_STACK_STATE=<state folder>`` in its
environment, and so does what it starts in turn (Airflow's tasks, the proxies and model
servers they deploy). The local target's proxy and model servers are also known by their own
setting (``PIPELINE_DEPLOY_LOCAL_STATE_DIR``), whoever started them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil

MARKER, SERVICE = "PIPELINE_STACK_STATE", "PIPELINE_STACK_SERVICE"
ARGV = "PIPELINE_STACK_ARGV"  # what a service was started as (JSON): `up` restarts it if changed
PRIVATE_UMASK = 0o077  # what the stack writes is its owner's only: 0600 files, 0700 folders
# `down` stops them in this order: no scrape records the others going down as an outage, no
# Airflow task or proxy starts a model server meanwhile, PostgreSQL outlives its clients.
# A service is ranked by its name's first word ("airflow-scheduler" as "airflow").
STOP_ORDER = {"prometheus": 0, "airflow": 1, "worker": 1, "proxy": 1, "postgres": 3}  # others: 2


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def open_private(path: Path, mode: str = "ab") -> IO[Any]:
    """Open ``path`` (created if missing) as 0600, also when it existed with a wider mode."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def make_private(*paths: Path) -> None:
    """chmod what exists of ``paths``: files 0600, directories 0700 (not recursive)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def write_private_text(path: Path, text: str) -> bool:
    """Replace ``path`` (0600, in a 0700 folder) atomically; False if it already held ``text``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            make_private(path)
            return False
    tmp = path.with_name(f".{path.name}.tmp")
    with open_private(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return True


def secret_file(path: Path, make) -> str:
    """Read a generated secret, creating it (0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(make())
    return path.read_text().strip()


def spawn(argv: list[str], env: dict[str, str], log: Path, **popen: Any) -> subprocess.Popen:
    """Start ``argv`` in its own session (in the checkout unless ``cwd``), output appended to
    ``log`` (0600), umask 077."""
    log.parent.mkdir(parents=True, exist_ok=True)
    popen.setdefault("cwd", Path(__file__).resolve().parents[2])
    with open_private(log) as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, umask=PRIVATE_UMASK, **popen,
        )  # fmt: skip


@contextlib.contextmanager
def stack_lock(state: Path, command: str, *, interrupt: bool = False):
    """Hold the stack lock of ``state``: `up`, `run`, `resume` and `down` take turns. One that
    waits says who holds it; ``interrupt`` (`down`) first stops (SIGTERM) an `up`, `run` or
    `resume` that holds it."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "stack.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(state)
            say(f"waiting for the stack lock ({fh.name}), held by {holder.get('what', '?')}")
            if interrupt and holder.get("command") in ("up", "run", "resume"):
                say(f"stopping `stack.py {holder['command']}` (pid {holder['pid']}) first")
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(holder["pid"])
                    if any(arg.endswith("stack.py") for arg in proc.cmdline()):  # not reused
                        terminate([proc], timeout_s=10)
            fcntl.flock(fh, fcntl.LOCK_EX)
        what = f"`stack.py {command}` (pid {os.getpid()}, since {time.strftime('%H:%M:%S')})"
        fh.truncate(0)
        fh.write(json.dumps({"command": command, "pid": os.getpid(), "what": what}))
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)


def lock_holder(state: Path) -> str | None:
    """Who holds the stack lock of ``state`` now, or None."""
    with contextlib.suppress(OSError), open(state / "stack.lock") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(state).get("what", "?")
    return None


def _holder(state: Path) -> dict:
    try:
        return json.loads((state / "stack.lock").read_text())
    except (OSError, ValueError):
        return {}


def stack_processes(state: Path, serving: Path, sessions: dict[int, str]) -> dict[Any, str]:
    """``{process: service}`` of every live process of the stack of ``state``: those with its
    mark, the local target's of ``serving``, the other members of their sessions (each service
    runs in its own; Airflow's setproctitle hides the environment of some of its processes)
    and their descendants; never this process or its parents. ``sessions``: ``{sid: service}``
    known beforehand (an older stack.py's pid files)."""
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    everyone, alive, found, sessions = set(), {}, {}, dict(sessions)
    for proc in psutil.process_iter(["ppid", "cmdline", "environ", "status"], ad_value=None):
        everyone.add(proc.pid)
        if proc.pid in ours or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        alive[proc.pid] = proc
        env, role = proc.info["environ"] or {}, _role(proc)
        if env.get(MARKER) == str(state) or (
            role and env.get("PIPELINE_DEPLOY_LOCAL_STATE_DIR") == str(serving)
        ):
            found[proc] = role or env.get(SERVICE) or "other"
    for proc, service in found.items():  # not a session led by someone else (a terminal)
        if (sid := _sid(proc.pid)) and (sid not in everyone or alive.get(sid) in found):
            sessions.setdefault(sid, service)
    for proc in alive.values():
        if proc not in found and (sid := _sid(proc.pid)) in sessions:
            found[proc] = _role(proc) or sessions[sid]
    todo = list(found)
    while todo:
        parent = todo.pop()
        for child in (p for p in alive.values() if p.info["ppid"] == parent.pid):
            if child not in found:
                found[child] = _role(child) or found[parent]
                todo.append(child)
    return found


def _role(proc: psutil.Process) -> str | None:
    argv = proc.info["cmdline"] or []
    if "serving.server" in argv:
        return "model-server"
    return "proxy" if "serving.deploy" in argv and "proxy" in argv else None


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def terminate(procs: list, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
    """Signal ``procs`` (and SIGCONT a stopped one), SIGKILL what is left after ``timeout_s``."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)
    for proc in psutil.wait_procs(procs, timeout=timeout_s)[1]:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _rank(service: str) -> int:
    return STOP_ORDER.get(service.split("-")[0], 2)


def stop_all(find: Callable[[], dict[Any, str]]) -> list[str]:
    """Stop every process ``find()`` names (``{process: service}``), service by service
    (STOP_ORDER), and again while new ones appear (started meanwhile by a task or a proxy);
    returns what was stopped."""
    stopped = []
    for _ in range(8):
        if not (found := find()):
            return stopped
        first = min(_rank(service) for service in found.values())
        batch = [p for p, service in found.items() if _rank(service) == first]
        if first == STOP_ORDER["postgres"]:  # a fast shutdown: SIGINT to the postmaster only
            pids = {p.pid for p in batch}
            terminate([p for p in batch if p.info["ppid"] not in pids], signal.SIGINT, 60)
        terminate(batch)
        stopped.append(f"{', '.join(sorted({found[p] for p in batch}))} ({len(batch)} processes)")
    raise RuntimeError(f"processes of the stack keep appearing: {find()}")
