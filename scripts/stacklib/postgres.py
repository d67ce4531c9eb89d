"""The stack's own PostgreSQL server (PIPELINE_DB=postgres), from Debian's binaries."""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import quote

from scripts.stacklib.processes import PRIVATE_UMASK, open_private, secret_file


class LocalPostgres:
    """A private PostgreSQL server: data directory, unix socket and passwords under ``root``.

    It runs as the ``postgres`` system user when started by root (PostgreSQL refuses to run as
    root), as the current user otherwise, and listens on ``host:port`` (SCRAM passwords) and on
    a socket in ``root/run``. Each client gets a database and a login role of the same name,
    its generated password in a 0600 file under ``root/secrets`` (so does the superuser).
    """

    SUPERUSER = "postgres"

    def __init__(self, root: Path, port: int, host: str = "127.0.0.1", settings=None) -> None:
        self.root, self.port, self.host = Path(root), port, host
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.settings = {"max_connections": "200", **(settings or {})}

    @staticmethod
    def bin_dir() -> Path | None:
        """Where initdb, postgres and pg_ctl are: $PIPELINE_PG_BIN_DIR, the newest Debian
        /usr/lib/postgresql/<major>/bin, or next to a `postgres` on PATH."""
        if os.environ.get("PIPELINE_PG_BIN_DIR"):
            found = [Path(os.environ["PIPELINE_PG_BIN_DIR"])]
        else:
            debian = Path("/usr/lib/postgresql").glob("*/bin")
            found = sorted(debian, key=lambda p: float(p.parent.name), reverse=True)
            found += [Path(p).parent for p in [shutil.which("postgres")] if p]
        tools = ("initdb", "postgres", "pg_ctl")
        return next((d for d in found if all(os.access(d / t, os.X_OK) for t in tools)), None)

    @staticmethod
    def os_user() -> pwd.struct_passwd | None:
        """``postgres`` when we are root (KeyError without it), else None: ourselves."""
        if os.geteuid() != 0:
            return None
        return pwd.getpwnam(os.environ.get("PIPELINE_PG_OS_USER", "postgres"))

    @classmethod
    def unavailable(cls) -> str | None:
        """Why a server cannot be started on this machine, or None when it can."""
        if cls.bin_dir() is None:
            return (
                "no PostgreSQL server binaries (initdb, postgres, pg_ctl) under "
                "/usr/lib/postgresql/*/bin or on PATH: run scripts/install_postgres.sh "
                "(apt-get install postgresql)"
            )
        try:
            cls.os_user()
        except KeyError:
            return (
                "running as root and there is no `postgres` system user to run PostgreSQL as "
                "(it refuses to run as root); `apt-get install postgresql` creates it"
            )
        return None

    def _run(self, tool: str, *args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
        """Run one of its programs as the server's user, in ``root``, with a small env."""
        if self.bin_dir() is None:
            raise SystemExit(f"PostgreSQL: {self.unavailable()}")
        user = self.os_user()
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", **(env or {})}
        argv = [str(self.bin_dir() / tool), *args]
        return subprocess.run(argv, cwd=self.root, env=env, umask=PRIVATE_UMASK, **kwargs)

    def password(self, role: str) -> str:
        path = self.root / "secrets" / f"{role}.password"
        return secret_file(path, lambda: secrets.token_urlsafe(24))

    def url(self, name: str) -> str:
        """SQLAlchemy URL of database ``name`` as its own role (psycopg 3 driver)."""
        user, password = quote(name, safe=""), quote(self.password(name), safe="")
        return f"postgresql+psycopg://{user}:{password}@{self.host}:{self.port}/{user}"

    def prepare(self) -> None:
        """Folders owned by the server's user and reachable by it; initdb on first use."""
        user = self.os_user()
        (self.root / "secrets").mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = self.root / "data.initdb"  # initdb here, renamed once done: never half a cluster
        shutil.rmtree(fresh, ignore_errors=True)
        for path in [self.sockets] + ([] if (self.data / "PG_VERSION").exists() else [fresh]):
            path.mkdir(mode=0o700, exist_ok=True)
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
        if user is not None:
            os.chmod(self.root, 0o711)  # it may enter, not list (secrets/ stays ours)
            _check_reachable(self.root, user)
        if not fresh.exists():
            return
        pwfile = self.root / ".initdb-password"  # the superuser's, for the server's user
        with open_private(pwfile, "w") as fh:
            fh.write(self.password(self.SUPERUSER) + "\n")
        if user is not None:
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            options = ["--auth", "scram-sha-256", "--encoding", "UTF8", "--no-locale"]
            done = self._run(
                "initdb", "--pgdata", str(fresh), "--username", self.SUPERUSER,
                "--pwfile", str(pwfile), *options, capture_output=True, text=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        fresh.rename(self.data)

    def start(self, log: Path, env: dict[str, str] | None = None, timeout_s: int = 60) -> None:
        """`pg_ctl start -w`: back once the server accepts connections; its output in ``log``."""
        options = ["-p", str(self.port), "-c", f"listen_addresses={self.host}"]
        options += ["-c", f"unix_socket_directories={self.sockets}"]
        options += [arg for k, v in self.settings.items() for arg in ("-c", f"{k}={v}")]
        with open_private(log) as out:
            done = self._run(
                "pg_ctl", "start", "-w", "-t", str(timeout_s), "-D", str(self.data),
                "-o", shlex.join(options), env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start (pg_ctl start: {done.returncode})")

    def stop(self, timeout_s: int = 60) -> None:
        """Fast shutdown (`pg_ctl stop -m fast`): sessions are ended, then a checkpoint."""
        if (self.data / "postmaster.pid").exists():
            args = ("-D", str(self.data), "-m", "fast", "-w", "-t", str(timeout_s))
            self._run("pg_ctl", "stop", *args, capture_output=True)

    def ensure_database(self, name: str) -> str:
        """Role ``name`` (password from its secret file, set again on every call) owning
        database ``name``; returns its URL."""
        import psycopg
        from psycopg import sql

        login = {"user": self.SUPERUSER, "password": self.password(self.SUPERUSER)}
        with psycopg.connect(
            host=self.host, port=self.port, dbname="postgres", autocommit=True, **login
        ) as conn:
            role = sql.Identifier(name)
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = sql.SQL("ALTER" if exists else "CREATE")
            password = sql.Literal(self.password(name))
            conn.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(verb, role, password))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(role, role))
        return self.url(name)


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """``user`` may enter ``path`` and every folder above it, or PermissionError naming one."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for folder in [path, *path.parents]:
        st = folder.stat()
        mine, ours = st.st_uid == user.pw_uid, st.st_gid in groups
        bit = stat.S_IXUSR if mine else stat.S_IXGRP if ours else stat.S_IXOTH
        if not st.st_mode & bit:
            raise PermissionError(
                f"PostgreSQL runs as {user.pw_name}, which cannot enter {folder} "
                f"(mode {stat.S_IMODE(st.st_mode):o}): `chmod o+x {folder}`, or set "
                "PIPELINE_STATE_DIR to a directory it can reach"
            )


def airflow_db_env(url: str | None) -> dict[str, str]:
    """Airflow's settings for its metadata DB at ``url`` (None: SQLite in AIRFLOW_HOME). Its
    async engine gets the same psycopg 3 URL (derived, it would ask for asyncpg: not here)."""
    env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url} if url else {}
    if url and url.startswith("postgresql+psycopg://"):
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = url
    return env


def with_psycopg(url: str) -> str:
    """A PostgreSQL URL with the installed driver (psycopg 3, not psycopg2)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def describe_db(url: str | None, sqlite_default: str = "airflow.db") -> str:
    """Where a database is, without its password."""
    if url is None or url.startswith("sqlite:"):
        return f"SQLite ({url.split(':///', 1)[-1] if url else sqlite_default})"
    from sqlalchemy.engine import make_url

    return f"PostgreSQL ({make_url(url).render_as_string(hide_password=True)})"
