"""An S3-compatible object store on this machine: MinIO, built from the Go module pinned in
scripts/objectstore (``make objectstore-tools``), run as its own process.

It holds what the machines of the distributed shape share: the data partitions
(``PIPELINE_DATA_PATH=s3://…``) and MLflow's artifacts (``mlflow server --artifacts-destination
s3://…``). Its root credentials are generated into ``root/secrets`` (0600) on first use; clients
get them as the AWS variables every S3 client reads (``client_env``), and Airflow's tasks from
the ``aws_default`` Connection (``connection_uri``).

    python -m scripts.stacklib.objectstore build    # build the server into the cache
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from scripts.stacklib import gobuild
from scripts.stacklib.processes import secret_file, spawn

MODULE = Path(__file__).resolve().parents[1] / "objectstore"
PACKAGES = {"minio": "github.com/minio/minio"}
REGION = "us-east-1"


def binary() -> Path:
    """The server binary (:class:`gobuild.Unavailable` says how to build it when missing)."""
    return gobuild.find(MODULE, tuple(PACKAGES), make="objectstore-tools")["minio"]


class ObjectStore:
    """A MinIO server: data under ``root/data``, credentials under ``root/secrets``, listening
    on ``host:port`` only (no console)."""

    def __init__(self, root: Path, port: int, host: str = "127.0.0.1") -> None:
        self.root, self.port, self.host = Path(root), port, host
        self.endpoint = f"http://{host}:{port}"

    def credentials(self) -> tuple[str, str]:
        folder = self.root / "secrets"
        user = secret_file(folder / "access-key", lambda: "pipeline-" + secrets.token_hex(6))
        return user, secret_file(folder / "secret-key", lambda: secrets.token_urlsafe(30))

    def client_env(self) -> dict[str, str]:
        """What an S3 client needs: boto3, s3fs and MLflow's S3 artifact repository."""
        key, secret = self.credentials()
        return {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def connection_uri(self) -> str:
        """The Airflow Connection (type ``aws``) of this store, as a URI."""
        key, secret = (quote(s, safe="") for s in self.credentials())
        return f"aws://{key}:{secret}@/?endpoint_url={quote(self.endpoint, safe='')}"

    def argv(self) -> list[str]:
        (self.root / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
        address = f"{self.host}:{self.port}"
        return [str(binary()), "server", "--quiet", "--address", address, str(self.root / "data")]

    def server_env(self) -> dict[str, str]:
        key, secret = self.credentials()
        return {
            "MINIO_ROOT_USER": key,
            "MINIO_ROOT_PASSWORD": secret,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_REGION": REGION,
            "HOME": str(self.root),  # its client config folder (~/.minio), not the user's
            "PATH": "/usr/bin:/bin",
        }

    def start(self, log: Path) -> subprocess.Popen:
        return spawn(self.argv(), self.server_env(), log, cwd=self.root)

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.endpoint}/minio/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self):
        """A boto3 S3 client of this store."""
        import boto3
        from botocore.config import Config

        key, secret = self.credentials()
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name=REGION,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )

    def ensure_bucket(self, name: str) -> None:
        s3 = self.client()
        if name not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=name)


def main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print(__doc__)
        return 2
    try:
        print(gobuild.build(MODULE, PACKAGES))
    except gobuild.Unavailable as exc:
        print(f"object store: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
