"""The distributed shape of the stack (``PIPELINE_EXECUTOR=celery``) on one machine.

Airflow's scheduler, DAG processor and API server run on the host, on PostgreSQL, with the
CeleryExecutor and Redis (Debian's ``redis-server``) as its broker and result backend. Two
Celery workers each run as a host of their own:

- **its own network namespace** (``ip netns``), joined to the host by a veth pair on a bridge:
  the workers reach the host's services at the bridge address, and nothing at its loopback;
- **its own system user** (``pipeline-worker-a`` / ``-b``, scripts/install_distributed.sh),
  working folder and mount namespace: there the state folder is an empty tmpfs with only the
  host's own folder bound back, and on disk the scheduler's state (``.local/airflow``, logs,
  secrets, databases) is root's only (0700/0600): a worker cannot read it;
- **nothing shared but the broker, the API server and the object store**: no database URL, no
  Airflow Connection in its environment (tasks get them from the API server), the data and
  MLflow's artifacts in the object store (scripts/stacklib/objectstore.py).

Worker ``b`` is the serving host: it also serves the ``serving`` queue, where the tasks that
read or change the local target run (their model servers then run on it, at its address).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from scripts.stacklib import gobuild
from scripts.stacklib.objectstore import ObjectStore
from scripts.stacklib.processes import open_private, secret_file, write_private_text
from serving.deploy.local import wait_for

BUCKET = "pipeline"
SERVING_QUEUE = "serving"
WORKERS = {"a": "default", "b": f"default,{SERVING_QUEUE}"}  # host -> the queues it serves
SERVING_HOST = "b"
SERVICES = ("objectstore", "redis", "airflow-scheduler", "airflow-dag-processor",
            "airflow-api-server", *(f"worker-{name}" for name in WORKERS))  # fmt: skip
# What a worker may take from the stack's environment (settings, not secrets or local paths).
DROPPED = ("PIPELINE_WEBHOOK_SECRET", "PIPELINE_AIRFLOW_DB_URL", "PIPELINE_MLFLOW_DB_URL")


def enabled() -> bool:
    kind = os.environ.get("PIPELINE_EXECUTOR", "").strip().lower() or "local"
    if kind not in ("local", "celery"):
        raise SystemExit(f"PIPELINE_EXECUTOR={kind!r}: use local (the default) or celery")
    return kind == "celery"


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    user: str
    home: Path  # its working folder, in the state folder it cannot see
    state: Path

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host: in its network namespace and a mount namespace of its
        own (``ip netns exec`` makes one) where the stack's state folder is an empty tmpfs
        with only the host's folder bound back, as its user, without capabilities."""
        q, home = shlex.quote, shlex.quote(str(self.home))
        script = ["set -e", "umask 022", f"exec 4<{home}"]
        if (blocked := _unreachable(Path(sys.base_prefix), self.user)) is not None:
            # The interpreter lies in a folder the user may not enter (a root-only home).
            prefix = q(sys.base_prefix)
            script += [f"exec 5<{prefix}", f"mount -t tmpfs -o mode=0755 none {q(str(blocked))}"]
            script += [f"mkdir -p {prefix}", f"{BIND} /proc/self/fd/5 {prefix}"]
        script += [f"mount -t tmpfs -o mode=0711 none {q(str(self.state))}", f"mkdir -p {home}"]
        script += [f"{BIND} /proc/self/fd/4 {home}", "exec 4<&- 5<&-", "umask 077"]
        script += [f'exec setpriv --reuid={self.user} --regid={self.user} --clear-groups -- "$@"']
        return ["ip", "netns", "exec", self.netns, "sh", "-c", "\n".join(script), "host", *argv]


BIND = "mount --no-canonicalize --bind"  # from a descriptor opened before the folder was hidden


def _unreachable(path: Path, user: str) -> Path | None:
    """The first folder above ``path`` that ``user`` may not enter (no x bit for it)."""
    entry = pwd.getpwnam(user)
    for folder in reversed(path.parents):
        st = folder.stat()
        bits = 0o100 if st.st_uid == entry.pw_uid else 0o010 if st.st_gid == entry.pw_gid else 0o001
        if not st.st_mode & bits:
            return folder
    return None


class Network:
    """The hosts' namespaces, veth pairs and bridge; named after the state folder, so that
    two stacks (or a stack and the tests) on one machine never share them."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.tag = hashlib.sha256(str(state).encode()).hexdigest()[:6]
        self.bridge = f"pwb{self.tag}"

    @property
    def gateway(self) -> str:
        """The host's address on the bridge (what the workers reach its services at)."""
        if found := _addresses(self.bridge):
            return found[0]
        taken = {a.rsplit(".", 1)[0] for a in _addresses()}
        start = int(self.tag, 16) % 200
        for n in range(start, start + 200):
            if (prefix := f"10.213.{20 + n % 200}") not in taken:
                return f"{prefix}.1"
        raise SystemExit("no free 10.213.x.0/24 network for the worker hosts")

    def hosts(self) -> list[Host]:
        prefix = self.gateway.rsplit(".", 1)[0]
        home, user = self.state / "hosts", "pipeline-worker-{}".format
        return [
            Host(
                name,
                f"pw{self.tag}{name}",
                f"{prefix}.{2 + i}",
                user(name),
                home / name,
                self.state,
            )
            for i, name in enumerate(WORKERS)
        ]

    def up(self) -> None:
        gateway = self.gateway
        if not _links(self.bridge):
            _ip("link", "add", self.bridge, "type", "bridge")
        if not _addresses(self.bridge):
            _ip("addr", "add", f"{gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts():
            veth = f"{host.netns}v"
            if not _links("eth0", host.netns):  # its end of the veth pair, in its namespace
                self._remove(host)  # what is left of a half-made or half-removed host
                _ip("netns", "add", host.netns)
                peer = ("peer", "name", "eth0", "netns", host.netns)
                _ip("link", "add", veth, "type", "veth", *peer)
                _ip("link", "set", veth, "master", self.bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
            # Its folder only: the state folder and hosts/ it may enter, not list.
            host.home.mkdir(parents=True, exist_ok=True)
            for folder, mode in ((self.state, 0o711), (host.home.parent, 0o711)):
                os.chmod(folder, mode)
            user = pwd.getpwnam(host.user)
            os.chown(host.home, user.pw_uid, user.pw_gid)
            os.chmod(host.home, 0o700)

    def down(self) -> None:
        if shutil.which("ip") is None or not _links(self.bridge):
            return
        for host in self.hosts():
            self._remove(host)
        _ip("link", "del", self.bridge)

    @staticmethod
    def _remove(host: Host) -> None:
        """Its veth pair (gone at once, even while its namespace lingers) and namespace."""
        if _links(f"{host.netns}v"):
            _ip("link", "del", f"{host.netns}v")
        if host.netns in _netns():
            _ip("netns", "del", host.netns)


def unavailable() -> str | None:
    """Why the distributed shape cannot start on this machine, or None."""
    from scripts.stacklib import objectstore
    from scripts.stacklib.postgres import LocalPostgres

    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "network namespaces and the worker users need root on Linux"
    missing = [tool for tool in ("ip", "setpriv", "redis-server") if shutil.which(tool) is None]
    users = [f"pipeline-worker-{name}" for name in WORKERS]
    try:
        for user in users:
            pwd.getpwnam(user)
    except KeyError:
        missing.append(f"the users {', '.join(users)}")
    if missing:
        return f"no {', '.join(missing)}: run scripts/install_distributed.sh"
    try:
        objectstore.binary()
    except gobuild.Unavailable as exc:
        return f"object store: {exc}"
    return LocalPostgres.unavailable()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _addresses(device: str | None = None) -> list[str]:
    if shutil.which("ip") is None:  # up() says what is missing
        return []
    argv = ["ip", "-4", "-o", "addr", "show", *(["dev", device] if device else [])]
    done = subprocess.run(argv, capture_output=True, text=True)
    return [line.split()[3].split("/")[0] for line in done.stdout.splitlines()]


def _links(device: str, netns: str | None = None) -> bool:
    where = ["-n", netns] if netns else []
    return (
        subprocess.run(["ip", *where, "link", "show", device], capture_output=True).returncode == 0
    )


def _netns() -> set[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


# --- the services the hosts share ---------------------------------------------------------


class Shape:
    """The distributed stack of ``state``: its network, object store and broker, and the
    environment and command lines of its Airflow processes."""

    def __init__(self, state: Path, env: Mapping[str, str] = os.environ) -> None:
        self.state, self.network = state, Network(state)
        self.host = self.network.gateway
        port = int(env.get("PIPELINE_OBJECT_STORE_PORT", "19000"))
        self.store = ObjectStore(state / "objectstore", port, self.host)
        self.redis_port = int(env.get("PIPELINE_REDIS_PORT", "16379"))
        self.settings = env
        self.serving = next(h for h in self.network.hosts() if h.name == SERVING_HOST)

    def redis_password(self) -> str:
        return secret_file(self.state / "secrets" / "redis", lambda: os.urandom(24).hex())

    def redis_argv(self) -> list[str]:
        """Redis as the broker: on the bridge address only, with a password, no persistence
        (queued tasks are the scheduler's to send again; it does after a restart)."""
        folder = self.state / "redis"
        conf = f"""bind {self.host}
port {self.redis_port}
requirepass {self.redis_password()}
dir {folder}
save ""
appendonly no
daemonize no
set-proc-title no
"""
        write_private_text(folder / "redis.conf", conf)
        return [shutil.which("redis-server") or "redis-server", str(folder / "redis.conf")]

    def env(self) -> dict[str, str]:
        """What the stack's own processes get on top of the local stack's environment."""
        broker = f"redis://:{self.redis_password()}@{self.host}:{self.redis_port}"

        def secret(name: str) -> str:
            return secret_file(self.state / "secrets" / name, lambda: os.urandom(32).hex())

        return {
            # Airflow's and Celery's process titles otherwise overwrite /proc/<pid>/environ,
            # where `make stop` finds the stack's processes (each service leads its session).
            "SPT_NOENV": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # task logs, not a terminal
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": f"{broker}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"{broker}/1",
            # Shared by every component: task tokens (JWT) and the workers' log server (API).
            "AIRFLOW__API_AUTH__JWT_SECRET": secret("airflow-jwt"),
            "AIRFLOW__API__SECRET_KEY": secret("airflow-api"),
            # A dead worker's task is failed (and retried elsewhere) in seconds, not minutes.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": self.settings.get(
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT", "60"
            ),
            "AIRFLOW_CONN_AWS_DEFAULT": self.store.connection_uri(),
            "PIPELINE_DATA_PATH": self.settings.get("PIPELINE_DATA_PATH", f"s3://{BUCKET}/data"),
            "PIPELINE_DEPLOY_LOCAL_QUEUE": SERVING_QUEUE,
            "PIPELINE_DEPLOY_LOCAL_HOST": self.serving.address,
            "PIPELINE_DEPLOY_LOCAL_STATE_DIR": str(self.serving.home / "serving"),
        }

    artifacts = f"s3://{BUCKET}/mlflow"  # MLflow's artifact store

    def up(self, start: Callable, wait: Callable) -> None:
        """The hosts' network, the object store (with its bucket) and the broker.
        ``start``/``wait``: the stack's (a service started once, an HTTP wait)."""
        import redis

        if reason := unavailable():
            raise SystemExit(f"PIPELINE_EXECUTOR=celery: {reason}")
        self.network.up()
        alive = start("objectstore", self.store.argv(), self.store.server_env())
        wait(f"{self.store.endpoint}/minio/health/ready", "the object store", 60, alive)
        self.store.ensure_bucket(BUCKET)
        alive = start("redis", self.redis_argv(), {"PATH": "/usr/bin:/bin"})
        broker = redis.Redis(self.host, self.redis_port, password=self.redis_password())

        def answers() -> bool:
            if not alive():
                raise SystemExit(f"Redis exited during start-up; see {self.state / 'logs'}")
            with contextlib.suppress(redis.RedisError):
                return bool(broker.ping())
            return False

        if not wait_for(answers, 30, 0.2):
            raise SystemExit(f"Redis did not answer at {self.host}:{self.redis_port}")

    def airflow_up(self, start: Callable, env: dict[str, str], airflow: Path) -> Callable:
        """Migrate the metadata DB, then start the scheduler, the DAG processor and the API
        server on this host and a Celery worker on each worker host; returns the API
        server's liveness."""
        log = self.state / "logs" / "airflow-db-migrate.log"
        if not _answers(f"{env['AIRFLOW__API__BASE_URL']}/api/v2/monitor/health"):
            with open_private(log) as out:  # (a running API server's database is migrated)
                migrate = [str(airflow), "db", "migrate"]
                if subprocess.run(migrate, env=env, stdout=out, stderr=out).returncode:
                    raise SystemExit(f"airflow db migrate failed; see {log}")
        for component in ("scheduler", "dag-processor"):
            start(f"airflow-{component}", [str(airflow), component], env)
        alive = start("airflow-api-server", [str(airflow), "api-server"], env)
        for host in self.network.hosts():
            argv, host_env = self.worker_argv(host, airflow), self.worker_env(host, env)
            start(f"worker-{host.name}", argv, host_env, cwd=host.home)
        return alive

    def worker_env(self, host: Host, stack_env: dict[str, str]) -> dict[str, str]:
        """A worker's whole environment: settings, the broker and the API server; its own
        folders; no database, no Connection, no credentials of the host's services."""
        airflow = ("AIRFLOW__CORE__", "AIRFLOW__CELERY__", "AIRFLOW__API", "AIRFLOW__LOGGING__")
        kept = {
            k: v
            for k, v in stack_env.items()
            if (
                k.startswith(("PIPELINE_", "TF_", "NO_PROXY", "SPT_", *airflow))
                and k not in DROPPED
            )
            or k in ("PATH", "PYTHONPATH", "LANG", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        }
        return kept | {
            "HOME": str(host.home),
            "PIPELINE_STATE_DIR": str(host.home),
            "AIRFLOW_HOME": str(host.home / "airflow"),
            "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is not its to write
            # The address the API server fetches this worker's task logs from.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "scripts.stacklib.distributed.host_address",
            "PIPELINE_HOST_ADDRESS": host.address,
        }

    def worker_argv(self, host: Host, airflow: Path) -> list[str]:
        queues = WORKERS[host.name]
        argv = [str(airflow), "celery", "worker", "--queues", queues, "--concurrency", "2"]
        return host.argv([*argv, "--celery-hostname", f"worker-{host.name}@%h"])

    def serving_cli(self, *args: str) -> int:
        """``python -m serving.deploy <args>`` on the serving host (``resume``, a rollout),
        with the MLflow endpoint a task would get from its Connection."""
        env = self.worker_env(self.serving, dict(os.environ))
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
        argv = self.serving.argv([sys.executable, "-m", "serving.deploy", *args])
        return subprocess.run(argv, env=env, cwd=self.serving.home, check=False).returncode


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def host_address() -> str:
    """``[core] hostname_callable`` of the workers: the address of their host."""
    return os.environ["PIPELINE_HOST_ADDRESS"]
