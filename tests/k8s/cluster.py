"""A real Kubernetes control plane for the k8s tier: etcd + kube-apiserver on loopback, nothing else.

Built by `make tools` (deploy/tools/install.sh) into ``.stoker/tools/bin``. Everything lives in one
temporary folder: etcd's data, the service-account key pair and the static token file made here,
the server's self-signed serving certificate, a kubeconfig for the admin token. No kubelet, no
scheduler, no controller manager: objects are stored and admitted (RBAC, PodSecurity, validation)
but nothing runs them, which is what the chart and nodewatch need to be checked against.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import REPO_ROOT, free_ports

TOOLS_BIN = Path(os.environ.get("STOKER_TOOLS", REPO_ROOT / ".stoker" / "tools")) / "bin"
TOOLS = ("helm", "etcd", "kube-apiserver", "kubectl")


def tool(name: str) -> str:
    """The path of one of the k8s tools; fails with what to run when `make tools` has not."""
    path = TOOLS_BIN / name
    if not os.access(path, os.X_OK):
        raise AssertionError(f"{path} is missing: run `make tools` (deploy/tools/install.sh) first")
    return str(path)


class ClusterError(RuntimeError):
    pass


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(name: str, argv: list[str], folder: Path) -> Process:
    log_path = folder / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=folder)
    return Process(name, proc, log_path)


@dataclass
class Cluster:
    """A running control plane; ``kubeconfig`` is the admin's (``system:masters``)."""

    folder: Path
    server: str
    ca_file: Path
    admin_token: str
    kubeconfig: Path
    processes: list[Process] = field(default_factory=list)

    # ------------------------------------------------------------------ kubectl and raw requests

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout_s: float = 120) -> str:
        """``kubectl`` against this server; returns stdout, raises with stderr when it fails."""
        argv = [tool("kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout if check else done.stdout + done.stderr

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        """One API request; (status, JSON body). Errors are returned, not raised."""
        data = None if body is None else orjson.dumps(body)
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(req, context=context, timeout=30) as response:
                return response.status, orjson.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, orjson.loads(raw)
            except orjson.JSONDecodeError:
                return exc.code, raw.decode(errors="replace")

    def kubeconfig_for(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with ``token`` (a service account's, say)."""
        path.write_text(_kubeconfig(self.server, self.ca_file, token))
        return path

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (exit {p.proc.poll()}):\n{p.log()}" for p in self.processes)


def _kubeconfig(server: str, ca_file: Path, token: str) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": "test", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }
    return orjson.dumps(config).decode()  # JSON is YAML


def _wait_healthy(
    url: str, context: ssl.SSLContext | None, token: str | None, timeout_s: float, process: Process
) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise ClusterError(f"{process.name} exited with {process.proc.returncode}:\n{process.log()}")
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, context=context, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise ClusterError(f"{process.name} not healthy at {url} within {timeout_s}s ({last}):\n{process.log()}")


def start_cluster(folder: Path, timeout_s: float = 90.0, allow_privileged: bool = True) -> Cluster:
    """etcd, then kube-apiserver on free loopback ports; returns once ``/readyz`` answers 200.

    ``allow_privileged=False`` is a bare server's default, which refuses privileged containers.
    """
    for name in ("etcd", "kube-apiserver", "kubectl"):
        tool(name)
    folder.mkdir(parents=True, exist_ok=True)
    etcd_port, peer_port, api_port = free_ports(3)
    processes: list[Process] = []
    try:
        etcd = _start(
            "etcd",
            [
                tool("etcd"),
                "--name=test",
                f"--data-dir={folder / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=test=http://127.0.0.1:{peer_port}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",  # a throwaway store: no fsync keeps it fast on a busy disk
                "--log-level=warn",
            ],
            folder,
        )
        processes.append(etcd)
        _wait_healthy(f"http://127.0.0.1:{etcd_port}/health", None, None, timeout_s, etcd)

        # Service-account tokens are signed with this key pair (TokenRequest works without a
        # controller manager); the admin authenticates with a static token in system:masters.
        key, pub = folder / "sa.key", folder / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True
        )
        admin_token = secrets.token_hex(16)
        tokens = folder / "tokens.csv"
        tokens.write_text(f'{admin_token},admin,admin-uid,"system:masters"\n')
        tokens.chmod(0o600)
        certs = folder / "certs"
        api = _start(
            "kube-apiserver",
            [
                tool("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",  # a loopback address may not back the kubernetes Service
                f"--secure-port={api_port}",
                f"--cert-dir={certs}",
                f"--token-auth-file={tokens}",
                f"--service-account-key-file={pub}",
                f"--service-account-signing-key-file={key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=RBAC",
                # The agents are privileged containers; real clusters allow that (the kubelet's and
                # kube-apiserver's --allow-privileged, true on every managed offering), the bare
                # server's default refuses them. deploy/README.md, "What the cluster must allow".
                f"--allow-privileged={str(allow_privileged).lower()}",
                "--service-cluster-ip-range=10.96.0.0/24",  # a required setting; nothing is routed
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
            folder,
        )
        processes.append(api)
        server = f"https://127.0.0.1:{api_port}"
        ca_file = certs / "apiserver.crt"  # self-signed; the file holds the cert and its CA
        deadline = time.monotonic() + timeout_s
        while not ca_file.exists():
            if api.proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"kube-apiserver wrote no serving certificate:\n{api.log()}")
            time.sleep(0.1)
        context = ssl.create_default_context(cafile=str(ca_file))
        _wait_healthy(f"{server}/readyz", context, admin_token, timeout_s, api)
        kubeconfig = folder / "admin.kubeconfig"
        kubeconfig.write_text(_kubeconfig(server, ca_file, admin_token))
        return Cluster(folder, server, ca_file, admin_token, kubeconfig, processes)
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise


def helm(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """The real ``helm``, with its caches and config kept inside the repository's tool folder."""
    home = TOOLS_BIN.parent / "helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT
    )
