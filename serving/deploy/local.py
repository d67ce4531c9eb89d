"""The ``local`` deploy target: blue/green model-server processes behind a stable local port.

Layout of ``DeploySettings.local_state_dir``::

    proxy.pid / proxy.log     the front proxy (serving.deploy.proxy), one per state dir
    slot-<port>.pid / .log    a model server (`python -m serving.server`) on a slot port
                              (serving.deploy.slots: its command, start, readiness, stop)
    active.json               what the proxy serves, and how to start it again:
                              {version, model_uri, port, pid, cmd, tracking_uri, restarts, ...,
                               candidate: {version, port, pid, weight, mirror, ...}} (canary)
    prometheus-targets.json   the serving slots as Prometheus file_sd targets, each labelled
                              with its track (stable, canary): the rollout judge's series
    deploy.lock               serialises process changes (a deploy vs. the proxy's restarts)
    rollout.lock / .holder    the rollout slot (serving.deploy.rollout holds it for a whole
                              deploy-verify-promote) and who holds it

A deploy starts the new version on the slot that is not active, waits until it answers
``/ping`` and a real ``/invocations`` call with the model's input example, then atomically
replaces ``active.json`` (the proxy routes every request there from then on) and stops the
old slot after a short drain. If the new server never gets healthy it is killed and the
active slot is left untouched, so a failed deploy never takes the endpoint down.

A shadow or canary rollout (``serving.deploy.progressive``) starts the candidate on the idle
slot instead (:meth:`LocalTarget.start_candidate`, its histograms in the live version's
buckets), gives it a share of the predictions or of mirrored requests through
``active.json``'s ``candidate`` (:meth:`LocalTarget.route`), and then either makes it the
live version (:meth:`LocalTarget.promote_candidate`) or drops it: the record without the
candidate first, so every request is back on the live version at once
(:meth:`LocalTarget.drop_candidate`).

Every process is started in its own session (``start_new_session=True``), so it outlives the
Airflow task that started it and is stopped as a whole process group.

It heals like a Deployment: the proxy also watches the active model server and starts it again
(same command, same port) within seconds when it dies, and after ``make stop`` the state stays
behind (``stop_all()`` keeps ``active.json``), so the next start (:meth:`LocalTarget.resume`)
serves the same version again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.deploy.settings import DeploySettings
from serving.deploy.slots import SERVER_MODULE, DeployError, Slots, child_env, ping
from serving.deploy.supervisor import (  # the process helpers: also imported from here
    ACTIVE_FILE,
    DEPLOY_LOCK,
    PROXY_LOG,
    PROXY_PIDFILE,
    UPSTREAM_HOST,
    _accepting,
    _atomic_write_text,
    _live_pid,
    _tail,
    _try_flock,
    _unlink,
    atomic_write_json,
    process_is,
    spawn,
    stop_group,
    wait_for,
)
from serving.deploy.target import Live
from serving.deploy.verify import Endpoint, EndpointUnreachable

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

ROLLOUT_LOCK = "rollout.lock"
ROLLOUT_HOLDER = "rollout.holder"
# The slots as Prometheus file_sd targets, with their track (scripts/stacklib/prometheus.py).
TARGETS_FILE = "prometheus-targets.json"
_PROXY_START_TIMEOUT_S = 20.0


class LocalTarget:
    """Deploy a registered model version as a local process behind the front proxy."""

    name = "local"
    mirrors = True  # the front proxy mirrors a shadow's share

    def __init__(
        self, settings: DeploySettings, tracking_uri: str, *, drain_s: float = 2.0
    ) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.drain_s = drain_s
        self.state_dir = Path(settings.local_state_dir)

    @property
    def _slots(self) -> Slots:
        return Slots(self.settings, self.state_dir, self.tracking_uri)

    # -- public API ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The stable URL clients use (the proxy), whatever version is behind it."""
        return f"http://{self._front_host}:{self.settings.local_port}"

    def deploy(
        self,
        model_uri: str,
        version: str,
        *,
        input_example: pd.DataFrame | None = None,
    ) -> dict[str, Any]:
        """Roll ``model_uri`` out; returns a JSON-able summary.

        ``input_example`` is the smoke-test payload; by default the model's own logged input
        example (if it has none, readiness is judged by ``/ping`` alone).
        Raises :class:`DeployError` if the new server does not become healthy within
        ``settings.health_timeout_s``; the active version keeps serving in that case.
        """
        version = str(version)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._deploy_lock():
            self._ensure_proxy()
            active = self.read_active()
            previous_version = active.get("version") if active else None
            if (
                active
                and active.get("model_uri") == model_uri
                and str(active.get("version")) == version
                and process_is(active.get("pid"), SERVER_MODULE)
                and ping(active["port"])
            ):
                log.info("version %s (%s) is already live: nothing to do", version, model_uri)
                return {
                    "endpoint": self.endpoint,
                    "version": version,
                    "model_uri": model_uri,
                    "port": active["port"],
                    "pid": active.get("pid"),
                    "previous_version": previous_version,
                    "unchanged": True,
                }

            record, ready_s = self._start_beside(active, model_uri, version, input_example)
            port = record["port"]
            self._write_active(record)
            log.info(
                "version %s live on %s (slot port %s, ready in %.1fs); previous: %s",
                version,
                self.endpoint,
                port,
                ready_s,
                previous_version,
            )
            if active and active.get("port") != port:
                # Connections opened before the switch finish on the old server.
                time.sleep(self.drain_s)
                self._slots.stop(int(active["port"]))
            return {
                "endpoint": self.endpoint,
                **record,
                "previous_version": previous_version,
                "ready_s": ready_s,
                "unchanged": False,
            }

    def _start_beside(
        self,
        active: dict[str, Any] | None,
        model_uri: str,
        version: str,
        input_example: Any = None,
        extra: tuple[str, ...] = (),
    ) -> tuple[dict[str, Any], float]:
        """Start ``version`` on the slot the live server does not use and wait until it
        answers its smoke request; its ``active.json`` record and the seconds that took."""
        slots = self._slots
        payload = slots.smoke_payload(model_uri, input_example)
        port = slots.pick(active)
        slots.stop(port)  # whatever a previous (failed or killed) deploy left there
        if _accepting(UPSTREAM_HOST, port):
            raise DeployError(
                f"slot port {port} is in use by a process this target did not start; "
                "free it or change PIPELINE_DEPLOY_LOCAL_SLOT_PORTS"
            )
        started = time.monotonic()
        proc = slots.start(model_uri, port, extra)
        try:
            slots.wait_ready(proc, port, payload)
        except DeployError as exc:
            stop_group(proc.pid)
            _unlink(slots.pidfile(port))
            tail = _tail(slots.logfile(port))
            live = active.get("version") if active else None
            raise DeployError(
                f"version {version} ({model_uri}) did not become healthy on port {port}: "
                f"{exc}; the active version ({live or 'none'}) is unchanged.\n"
                f"--- last lines of {slots.logfile(port)} ---\n{tail}"
            ) from None
        record = {
            "version": version,
            "model_uri": model_uri,
            "port": port,
            "pid": proc.pid,
            "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            # What the proxy needs to start this server again if it dies (and after a
            # restart of the whole stack): with its own histogram buckets.
            "cmd": slots.command(model_uri, port),
            "tracking_uri": self.tracking_uri,
            "restarts": 0,
        }
        return record, round(time.monotonic() - started, 2)

    def _write_active(self, record: dict[str, Any]) -> None:
        """``active.json`` (the proxy routes by it from its next request on), and the slots
        as Prometheus file_sd targets with their track (the rollout judge's series)."""
        atomic_write_json(self.state_dir / ACTIVE_FILE, record)
        tracks = [("stable", record)] + [("canary", c) for c in [record.get("candidate")] if c]
        targets = [
            {"targets": [f"{UPSTREAM_HOST}:{r['port']}"],
             "labels": {"track": track, "version": str(r.get("version"))}}
            for track, r in tracks
        ]  # fmt: skip
        _atomic_write_text(self.state_dir / TARGETS_FILE, json.dumps(targets, indent=2) + "\n")

    # -- a candidate beside the live version (shadow, canary: serving.deploy.progressive) --

    def _candidate(self) -> tuple[dict[str, Any], dict[str, Any]]:
        active = self.read_active() or {}
        if not active.get("candidate"):
            raise DeployError("no candidate runs beside the live version")
        return active, active["candidate"]

    @property
    def candidate_endpoint(self) -> str:
        return f"http://{UPSTREAM_HOST}:{self._candidate()[1]['port']}"

    def start_candidate(self, model_uri: str, version: str, *, live_uri: str) -> dict[str, Any]:
        """Start ``version`` on the idle slot, beside the live one, with no traffic yet; its
        histograms take the buckets of ``live_uri`` (``--profile-from``)."""
        with self._deploy_lock():
            self._ensure_proxy()
            active = self.read_active()
            if active is None:
                raise DeployError("nothing is live: a candidate needs a version to run beside")
            record, ready_s = self._start_beside(
                active, model_uri, str(version), extra=("--profile-from", live_uri)
            )
            candidate = {**record, "weight": 0.0, "mirror": 0.0}
            self._write_active({**active, "candidate": candidate})
        return {"endpoint": self.candidate_endpoint, "port": record["port"], "ready_s": ready_s}

    def route(self, weight: float, mirror: float) -> None:
        """The candidate answers ``weight`` of the predictions and gets ``mirror`` of the
        others mirrored (both 0 to 1), from the proxy's next request on."""
        with self._deploy_lock():
            active, candidate = self._candidate()
            candidate = {**candidate, "weight": weight, "mirror": mirror}
            self._write_active({**active, "candidate": candidate})

    def candidate_healthy(self) -> bool:
        return ping(int(self._candidate()[1]["port"]))

    def promote_candidate(self) -> dict[str, Any]:
        """The candidate takes every request; the old live server stops after a drain."""
        with self._deploy_lock():
            active, candidate = self._candidate()
            record = {k: v for k, v in candidate.items() if k not in ("weight", "mirror")}
            self._write_active(record)
            time.sleep(self.drain_s)
            self._slots.stop(int(active["port"]))
        return {"endpoint": self.endpoint, "port": record["port"]}

    def drop_candidate(self) -> None:
        """Every request back on the live version at once, then the candidate stops."""
        if not (self.read_active() or {}).get("candidate"):
            return
        with self._deploy_lock():
            active = self.read_active()
            if not active or not active.get("candidate"):
                return
            candidate = active.pop("candidate")
            self._write_active(active)
            log.info("traffic back on version %s; stopping candidate version %s",
                     active.get("version"), candidate.get("version"))  # fmt: skip
            time.sleep(min(self.drain_s, 0.5))  # requests already sent to it finish
            self._slots.stop(int(candidate["port"]))

    def status(self) -> dict[str, Any] | None:
        """``active.json`` plus whether it answers; ``None`` if nothing was deployed."""
        active = self.read_active()
        if active is None:
            return None
        return {
            **active,
            "endpoint": self.endpoint,
            "healthy": ping(int(active["port"])),
            "proxy_running": self._proxy_pid() is not None
            and _accepting(self._front_host, self.settings.local_port),
        }

    def active_version(self) -> str | None:
        active = self.read_active()
        return str(active["version"]) if active and "version" in active else None

    def live(self) -> Live:
        """What the front port serves now and whether it answers (through the proxy)."""
        active = self.read_active()
        if active is None:
            return Live(None, False, "nothing deployed")
        version = str(active.get("version"))
        if not _accepting(self._front_host, self.settings.local_port):
            return Live(version, False, "the front proxy is not running")
        try:
            with Endpoint(self.endpoint, timeout_s=5.0) as endpoint:
                served = endpoint.served_version() if endpoint.ping() else None
        except EndpointUnreachable as exc:
            return Live(version, False, str(exc))
        if served is None:
            return Live(version, False, f"the model server on port {active.get('port')} is down")
        return Live(served, True, f"port {active.get('port')}, pid {active.get('pid')}")

    @contextlib.contextmanager
    def lock(self, holder: str) -> Iterator[None]:
        """The rollout slot of this target: one rollout (deploy, verify, promote) at a time.

        A second rollout waits here (Airflow's ``model_rollout`` pool normally keeps it from
        even starting); the holder file says who has it.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        wait_s = self.settings.rollout_lock_timeout_s
        with open(self.state_dir / ROLLOUT_LOCK, "a+") as fh:
            if not _try_flock(fh):
                log.info("waiting for the rollout slot, held by: %s", self._holder())
                if not wait_for(lambda: _try_flock(fh), wait_s, 0.5):
                    raise DeployError(
                        f"the rollout slot ({fh.name}) is held by {self._holder()} for more "
                        f"than {wait_s:.0f}s"
                    )
            _atomic_write_text(
                self.state_dir / ROLLOUT_HOLDER,
                f"{holder} (pid {os.getpid()}, since {datetime.now(UTC).isoformat()})\n",
            )
            try:
                yield
            finally:
                _unlink(self.state_dir / ROLLOUT_HOLDER)
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _holder(self) -> str:
        try:
            return (self.state_dir / ROLLOUT_HOLDER).read_text().strip()
        except OSError:
            return "unknown"

    def withdraw(self) -> None:
        """Stop serving and forget the version (nothing good to go back to)."""
        self.stop_all(forget=True)

    def resume(self, *, wait_s: float | None = None) -> Live:
        """After a restart: start the proxy, which starts the recorded version again.

        Waits until the endpoint answers (at most ``wait_s``, default the health timeout).
        """
        if self.read_active() is None:
            return Live(None, False, "nothing deployed")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_proxy()
        wait_for(lambda: self.live().healthy, wait_s or self.settings.health_timeout_s, 0.5)
        return self.live()

    def stop_all(self, *, forget: bool = False) -> dict[str, Any]:
        """Stop the proxy and every slot server (by pidfile).

        ``active.json`` stays unless ``forget``: it is the desired state, and the next
        :meth:`resume` (``make run`` after ``make stop``) serves the same version again.
        """
        stopped: dict[str, Any] = {}
        pid = self._proxy_pid()
        if pid is not None:
            stop_group(pid)
            stopped["proxy"] = pid
        _unlink(self.state_dir / PROXY_PIDFILE)
        ports = set(self.settings.local_slot_ports)
        active = self.read_active()
        if active:
            ports.add(int(active["port"]))
        for port in sorted(ports):
            slot_pid = self._slots.stop(port)
            if slot_pid is not None:
                stopped[f"slot-{port}"] = slot_pid
        if active and active.get("pid") and process_is(active["pid"], SERVER_MODULE):
            stop_group(int(active["pid"]))  # restarted by the proxy: not in a slot pidfile
            stopped.setdefault(f"slot-{active['port']}", active["pid"])
        if forget:
            _unlink(self.state_dir / ACTIVE_FILE)
        elif active and active.pop("candidate", None):
            self._write_active(active)  # a candidate is never resumed
        return stopped

    def read_active(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / ACTIVE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s: %s", self.state_dir / ACTIVE_FILE, exc)
            return None

    # -- the front proxy ----------------------------------------------------------------------

    @property
    def _front_host(self) -> str:
        host = self.settings.local_host
        return UPSTREAM_HOST if host in ("", "0.0.0.0", "::") else host

    def _proxy_pid(self) -> int | None:
        return _live_pid(self.state_dir / PROXY_PIDFILE, "serving.deploy", "proxy")

    def _ensure_proxy(self) -> None:
        host, port = self._front_host, self.settings.local_port
        pid = self._proxy_pid()
        if pid is not None:
            if wait_for(lambda: _accepting(host, port), 5.0):
                return
            log.warning("proxy pid %s is not accepting on %s:%s; restarting it", pid, host, port)
            stop_group(pid)
        logfile = self.state_dir / PROXY_LOG
        with open(logfile, "ab") as out:
            proc = spawn(
                [sys.executable, "-m", "serving.deploy", "proxy"],
                env=child_env(self.settings, self.state_dir),
                stdout=out,
            )
        log.info("started proxy pid %s on %s:%s (log: %s)", proc.pid, host, port, logfile)

        def up() -> bool:
            if proc.poll() is not None:
                raise DeployError(
                    f"the proxy exited with code {proc.returncode} (is {host}:{port} taken?)\n"
                    f"--- last lines of {logfile} ---\n{_tail(logfile)}"
                )
            return _accepting(host, port)

        if not wait_for(up, _PROXY_START_TIMEOUT_S):
            stop_group(proc.pid)
            raise DeployError(
                f"the proxy did not listen on {host}:{port} within {_PROXY_START_TIMEOUT_S:.0f}s"
                f"\n--- last lines of {logfile} ---\n{_tail(logfile)}"
            )

    # -- helpers ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _deploy_lock(self) -> Iterator[None]:
        wait_s = self.settings.health_timeout_s + 60
        with open(self.state_dir / DEPLOY_LOCK, "a+") as fh:
            if not wait_for(lambda: _try_flock(fh), wait_s, 0.25):
                raise DeployError(f"another deploy holds {fh.name} for more than {wait_s:.0f}s")
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
