"""A real Kubernetes control plane on 127.0.0.1, for the ``k8s`` test tier.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler of the Kubernetes release
pinned in ``tests/k8s/controlplane/go.mod``, and KWOK for the nodes and the pods' lifecycle.
Nothing is imitated above the nodes: API validation and defaulting, RBAC, PodSecurity
admission, server-side apply, the Deployment controller, the scheduler and EndpointSlices are
the real ones. Below them no container ever runs (there is no kubelet): KWOK moves pods
through their phases by the stages in ``tests/k8s/stages.yaml``, and serves pod logs on the
nodes' port 10250. What a container would do is played by ``tests/k8s/runtime.py``.

Binaries are found the way controller-runtime's envtest finds them: ``KUBEBUILDER_ASSETS``
names a folder holding any of them (envtest's download has etcd, kube-apiserver, kubectl);
the rest are built from the Go module with ``python -m tests.k8s.cluster build`` (``make
k8s-tools``) into a cache folder per machine, keyed by the module's pins.

    python -m tests.k8s.cluster build     # build what KUBEBUILDER_ASSETS does not provide
    python -m tests.k8s.cluster up        # start a plane, print its kubeconfig, wait for ^C
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from scripts.stacklib import gobuild
from scripts.stacklib.gobuild import Unavailable  # the plane cannot run here: tier skipped
from tests.ports import free_port

HERE = Path(__file__).resolve().parent
MODULE = HERE / "controlplane"
STAGES = HERE / "stages.yaml"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
)
# The Kubernetes release the tier runs (go.mod pins k8s.io/kubernetes at it).
KUBERNETES_VERSION = "1.37"
NODES = ("kwok-node-0", "kwok-node-1")
KUBELET_PORT = 10250
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"


# -- binaries ----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where the built binaries live: per machine, per set of pins."""
    return gobuild.cache_dir(MODULE)


def _assets() -> Path | None:
    return Path(os.environ["KUBEBUILDER_ASSETS"]) if os.environ.get("KUBEBUILDER_ASSETS") else None


def find_binaries() -> dict[str, Path]:
    """Each binary from ``KUBEBUILDER_ASSETS`` if it is there, else from the build cache."""
    return gobuild.find(MODULE, BINARIES, also=_assets(), make="k8s-tools")


def build() -> Path:
    """``go build`` every binary ``KUBEBUILDER_ASSETS`` does not provide into the cache."""
    packages = {
        "etcd": "./etcd",
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        "kwok": "sigs.k8s.io/kwok/cmd/kwok",
    }
    return gobuild.build(MODULE, packages, also=_assets(), ldflags=_version_ldflags())


def _version_ldflags() -> str:
    """What Kubernetes' own build stamps into its binaries (``/version``, ``kubectl version``):
    a plain ``go build`` leaves ``v0.0.0-master``, which clients cannot compare."""
    text = (MODULE / "go.mod").read_text()
    version = re.search(r"k8s\.io/kubernetes (v\d+\.(\d+)\.\d+)", text)
    if version is None:
        raise RuntimeError("tests/k8s/controlplane/go.mod does not require k8s.io/kubernetes")
    flags = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={version[1]}",
            f"-X {package}.gitMajor=1",
            f"-X {package}.gitMinor={version[2]}",
            f"-X {package}.gitTreeState=clean",
        ]
    return " ".join(flags)


# -- certificates ------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(folder: Path) -> None:
    """A CA, the API server's serving cert (also KWOK's), an admin client cert, the API
    server's client cert for kubelets (KWOK's server), and the service-account key pair."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)  # fmt: skip
    sans = "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes.default.svc"
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", sans),
        ("admin", "/O=system:masters/CN=admin", None),
        ("kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", None),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        extra = ["-extfile", "/dev/stdin"] if ext else []
        subprocess.run(
            ["openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
             "ca.key", "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *extra],
            cwd=folder, check=True, capture_output=True, input=(ext or "").encode(),
        )  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=folder)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=folder)


def kubeconfig(
    server: str, ca: Path, *, cert: Path | None = None, key: Path | None = None, token: str = ""
) -> str:
    user = {"client-certificate": str(cert), "client-key": str(key)} if cert else {"token": token}
    import yaml

    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}
            ],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }
    )


# -- the plane ---------------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """The processes of one plane, in ``root``; ``admin_kubeconfig`` is cluster-admin."""

    root: Path
    binaries: dict[str, Path] = field(default_factory=find_binaries)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pki = self.root / "pki"
        self.logs = self.root / "logs"
        self.etcd_port, self.peer_port = free_port(), free_port()
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.admin_kubeconfig = self.root / "admin.kubeconfig"

    # processes

    def _spawn(self, name: str, *args: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        self.processes[name] = subprocess.Popen(
            [str(self.binaries[name.split(":")[0]]), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # Never outlive the test process, however it ends (PR_SET_PDEATHSIG).
            preexec_fn=_die_with_parent,
        )

    def _stop(self, name: str, timeout: float = 10.0) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> ControlPlane:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ControlPlane:
        if shutil.which("openssl") is None:
            raise Unavailable("openssl is not installed (the plane's certificates need it)")
        if _port_taken(KUBELET_PORT):
            raise Unavailable(f"port {KUBELET_PORT} (the nodes' kubelet port, KWOK) is taken")
        make_pki(self.pki)
        self.admin_kubeconfig.write_text(
            kubeconfig(
                self.server,
                self.pki / "ca.crt",
                cert=self.pki / "admin.crt",
                key=self.pki / "admin.key",
            )
        )
        etcd_data = self.root / "etcd"
        self._spawn(
            "etcd",
            f"--data-dir={etcd_data}",
            f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{self.peer_port}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        )
        self.start_apiserver()
        kube = str(self.admin_kubeconfig)
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={kube}",
            f"--authentication-kubeconfig={kube}",
            f"--authorization-kubeconfig={kube}",
            "--leader-elect=false",
            "--secure-port=0",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Pods that would be gone in seconds on a real kubelet: collect terminated pods.
            "--terminated-pod-gc-threshold=50",
            # A kubelet renews its node Lease the moment the API server is back; KWOK may take
            # longer, and a node once marked NotReady leaves its pods unready for good (KWOK
            # does not report readiness again, a kubelet would). The API outage test must not
            # flip nodes: give them two minutes.
            "--node-monitor-grace-period=2m",
        )
        self._spawn(
            "kube-scheduler",
            f"--kubeconfig={kube}",
            f"--authentication-kubeconfig={kube}",
            f"--authorization-kubeconfig={kube}",
            "--leader-elect=false",
            "--secure-port=0",
        )
        self._spawn(
            "kwok",
            f"--kubeconfig={kube}",
            f"--config={STAGES}",
            "--manage-all-nodes=true",
            "--node-ip=127.0.0.1",
            # The port nodes advertise for their kubelet: the API server sends `kubectl logs`
            # there (tests/k8s/runtime.py answers). KWOK's own server listens elsewhere.
            f"--node-port={KUBELET_PORT}",
            f"--server-address=127.0.0.1:{free_port()}",
            f"--tls-cert-file={self.pki / 'apiserver.crt'}",
            f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--cidr={POD_CIDR}",
            # Nodes renew their Lease like a kubelet: without it the node lifecycle controller
            # marks them NotReady after 50 s, and every pod on them unready.
            "--node-lease-duration-seconds=40",
        )
        self._create_nodes()
        return self

    def start_apiserver(self, timeout: float = 60.0) -> float:
        """Start kube-apiserver (again, after :meth:`stop_apiserver`); seconds to ready."""
        pki = self.pki
        started = time.monotonic()
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # A loopback address cannot back the `kubernetes` Service: nothing needs it here.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.api_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            # PodSecurity is on by default; named so that nobody switches it off by accident.
            "--enable-admission-plugins=PodSecurity",
            "--profiling=false",
        )
        self._wait_ready(timeout)
        return time.monotonic() - started

    def stop_apiserver(self) -> None:
        self._stop("kube-apiserver")

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        tls = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        tls.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        last = ""
        with httpx.Client(verify=tls, timeout=2) as http:
            while time.monotonic() < deadline:
                proc = self.processes.get("kube-apiserver")
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"kube-apiserver exited:\n{self.log_tail('kube-apiserver')}")
                try:
                    resp = http.get(f"{self.server}/readyz")
                    if resp.status_code == 200:
                        return
                    last = f"{resp.status_code} {resp.text[-300:]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready in {timeout:g}s: {last}")

    def _create_nodes(self, timeout: float = 60.0) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        for name in NODES:
            core.create_node(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake"},
                        "labels": {"kubernetes.io/hostname": name, "type": "kwok"},
                    },
                    "status": {
                        "allocatable": {
                            "cpu": "32",
                            "memory": "256Gi",
                            "ephemeral-storage": "1Ti",
                            "pods": "110",
                        }
                    },
                }
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = core.list_node().items
            ready = [
                n
                for n in nodes
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            ]
            if len(ready) == len(NODES):
                return
            time.sleep(0.2)
        raise RuntimeError(f"KWOK did not make the nodes ready:\n{self.log_tail('kwok')}")

    def api_client(self, kubeconfig_path: Path | None = None):
        """A ``kubernetes`` ApiClient for a kubeconfig (default: cluster-admin)."""
        from kubernetes import config

        return config.new_client_from_config(str(kubeconfig_path or self.admin_kubeconfig))

    def token_kubeconfig(self, namespace: str, service_account: str, path: Path) -> Path:
        """A kubeconfig that authenticates as ``namespace/service_account`` (a bound token,
        as a pod of that ServiceAccount gets): RBAC decides for it exactly as in a pod."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        token = core.create_namespaced_service_account_token(
            service_account,
            namespace,
            {"spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 7200}},
        ).status.token
        path.write_text(kubeconfig(self.server, self.pki / "ca.crt", token=token))
        return path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True):
        return subprocess.run(
            [str(self.binaries["kubectl"]), f"--kubeconfig={self.admin_kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
        )

    def stop(self) -> None:
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver"):
            self._stop(name)
        self._stop("etcd")


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        try:
            print(build())
        except Unavailable as exc:
            print(f"k8s tier: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["up"]:
        plane = ControlPlane(Path(tempfile.mkdtemp(prefix="k8s-plane-"))).start()
        print(f"export KUBECONFIG={plane.admin_kubeconfig}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        finally:
            plane.stop()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
