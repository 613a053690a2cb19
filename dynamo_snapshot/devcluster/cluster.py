"""A real local Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler as child processes, with generated certificates and an admin kubeconfig.

Used by the tests (one per session) and by `make run`. Ports are chosen once and kept in `ports.json`, so a
component restarted later (to test watch recovery) comes back on the same address.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dynamo_snapshot.devcluster import binaries, pids
from dynamo_snapshot.devcluster.certs import CertificateAuthority, KeyPair, service_account_keys

SERVICE_CIDR = "10.0.0.0/24"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
_PORT_NAMES = ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ClusterError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def install_crds(kubectl: Callable[..., object], crd_dir: Path, timeout: float = 60) -> None:
    """Apply the CRDs of ``crd_dir`` (server-side) and wait until each is Established. ``kubectl(*args)``
    raises when the command fails. A CRD whose status the API server has not written yet makes ``kubectl
    wait`` fail at once ("status.conditions accessor error") instead of waiting: that is tried again."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd_dir))
    deadline = time.monotonic() + timeout
    while True:
        try:
            kubectl("wait", "--for=condition=Established", f"--timeout={timeout:.0f}s", "-f", str(crd_dir))
            return
        except Exception as err:  # ClusterError here, the tests' wrapper raises its own
            if "accessor error" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Component:
    name: str
    argv: Callable[[], list[str]]
    health_url: Callable[[], str]
    port_names: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)


class LocalCluster:
    def __init__(self, root: Path, *, components: tuple[str, ...] = CONTROL_PLANE, bin_dir: Path | None = None):
        self.root = Path(root).resolve()
        self.bin = bin_dir or binaries.require()
        self.components_enabled = components
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.ports = self._load_or_allocate_ports()
        self.ca = CertificateAuthority(self.root / "pki")
        self.sa = service_account_keys(self.root / "pki")
        self.serving = self.ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=("127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
                          "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
            client=False,
        )
        self.admin = self.ca.issue("admin", "dynamo-snapshot-admin", orgs=("system:masters",))
        self.kubelet_client = self.ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                            orgs=("system:masters",))
        self.kubeconfig = self.write_kubeconfig("admin", self.admin)
        self._components = {c.name: c for c in self._define_components()}

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['kube-apiserver']}"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['etcd']}"

    def _load_or_allocate_ports(self) -> dict[str, int]:
        path = self.root / "ports.json"
        if path.exists():
            ports = json.loads(path.read_text())
            if all(name in ports for name in _PORT_NAMES):
                return ports
        ports = {name: _free_port() for name in _PORT_NAMES}
        path.write_text(json.dumps(ports, indent=2))
        return ports

    def write_kubeconfig(self, user: str, pair: KeyPair, path: Path | None = None) -> Path:
        """A kubeconfig for `pair` (certificate data embedded, so it works from any directory)."""
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.server,
                                                        "certificate-authority-data": b64(self.ca.pair.cert)}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(pair.cert),
                                              "client-key-data": b64(pair.key)}}],
            "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
            "current-context": user,
        }
        path = path or self.root / f"{user}.kubeconfig"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        tmp.chmod(0o600)
        tmp.replace(path)
        return path

    def kubeconfig_for(self, user: str, *, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for another identity (an agent's, a kubelet's): RBAC applies to it, unlike admin."""
        pair = self.ca.issue(f"user-{user.replace(':', '_')}", user, orgs=groups)
        return self.write_kubeconfig(user.replace(":", "_"), pair)

    # -- components --------------------------------------------------------------------------------
    def _define_components(self) -> list[Component]:
        return [self._etcd(), self._apiserver(), self._controller_manager(), self._scheduler()]

    def _etcd(self) -> Component:
        ports = self.ports
        return Component(
            "etcd",
            lambda: [
                str(self.bin / "etcd"),
                "--name=default",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd-peer']}",
                f"--initial-cluster=default=http://127.0.0.1:{ports['etcd-peer']}",
                "--unsafe-no-fsync",  # a throwaway test store: durability is not the point, speed is
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
            lambda: f"http://127.0.0.1:{ports['etcd']}/health",
            ("etcd", "etcd-peer"),
        )

    def _apiserver(self) -> Component:
        ports = self.ports
        return Component(
            "kube-apiserver",
            lambda: [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports['kube-apiserver']}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.pair.cert}",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                f"--kubelet-certificate-authority={self.ca.pair.cert}",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            lambda: f"{self.server}/readyz",
            ("kube-apiserver",),
        )

    def _controller_manager(self) -> Component:
        pki = self.root / "pki"
        ports = self.ports
        kubeconfig = str(self.kubeconfig)
        return Component(
            "kube-controller-manager",
            lambda: [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-controller-manager']}",
                f"--cert-dir={pki / 'kcm'}",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.ca.pair.cert}",
                f"--cluster-signing-cert-file={self.ca.pair.cert}",
                f"--cluster-signing-key-file={self.ca.pair.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--controllers=*,-nodeipam",
                "--profiling=false",
                "--v=1",
            ],
            lambda: f"https://127.0.0.1:{ports['kube-controller-manager']}/healthz",
            ("kube-controller-manager",),
        )

    def _scheduler(self) -> Component:
        pki = self.root / "pki"
        ports = self.ports
        kubeconfig = str(self.kubeconfig)
        return Component(
            "kube-scheduler",
            lambda: [
                str(self.bin / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports['kube-scheduler']}",
                f"--cert-dir={pki / 'scheduler'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
            lambda: f"https://127.0.0.1:{ports['kube-scheduler']}/healthz",
            ("kube-scheduler",),
        )

    def add_component(self, component: Component) -> None:
        """Run another process as part of this cluster (a kubelet, say), started and stopped with it."""
        self._components[component.name] = component
        if component.name not in self.components_enabled:
            self.components_enabled = (*self.components_enabled, component.name)

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.pair.cert))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def _healthy(self, url: str) -> bool:
        if url.startswith(self.server):
            context = self._ssl_context()
        else:
            context = ssl._create_unverified_context()  # self-signed serving certs of kcm/scheduler
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start_component(self, name: str, timeout: float = 90.0) -> None:
        component = self._components[name]
        if component.process and component.process.poll() is None:
            return
        for port_name in component.port_names:
            if _port_in_use(self.ports[port_name]):
                raise ClusterError(
                    f"{name}: port {self.ports[port_name]} on 127.0.0.1 is in use by another process; "
                    f"stop it or remove {self.root / 'ports.json'} to pick new ports"
                )
        log_path = self.root / "logs" / f"{name}.log"
        log = log_path.open("ab")
        component.process = subprocess.Popen(
            component.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        pids.record(self.root, name, component.process.pid)
        deadline = time.monotonic() + timeout
        # Startup has no event to wait on but the health endpoint, so poll it.
        while not self._healthy(component.health_url()):
            if component.process.poll() is not None:
                raise ClusterError(
                    f"{name} exited with status {component.process.returncode} during startup; "
                    f"last lines of {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} was not healthy after {timeout:.0f}s; last lines of {log_path}:\n"
                                   f"{_tail(log_path)}")
            time.sleep(0.2)

    def stop_component(self, name: str, *, kill: bool = False, timeout: float = 20.0) -> None:
        component = self._components[name]
        process = component.process
        if process is None or process.poll() is not None:
            pids.forget(self.root, name)
            return
        try:
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        pids.forget(self.root, name)

    def restart_component(self, name: str, *, kill: bool = False) -> None:
        self.stop_component(name, kill=kill)
        self.start_component(name)

    def running(self, name: str) -> bool:
        process = self._components[name].process
        return process is not None and process.poll() is None

    def exited(self, lines: int = 8) -> list[str]:
        """The started components that are no longer running, each with its exit status and its log's
        last lines (what a test that waited in vain needs first)."""
        found = []
        for name, component in self._components.items():
            if component.process is not None and component.process.poll() is not None:
                found.append(f"{name} exited with status {component.process.returncode}; last lines of its log:\n"
                             + _tail(self.root / "logs" / f"{name}.log", lines))
        return found

    def start(self) -> LocalCluster:
        try:
            for name in self.components_enabled:
                self.start_component(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(list(self._components)):
            self.stop_component(name)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- etcd, for tests that need to expire resource versions ---------------------------------------
    def _etcd_post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.etcd_endpoint}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def etcd_revision(self) -> int:
        reply = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"/").decode(), "limit": 1})
        return int(reply["header"]["revision"])

    def compact_etcd(self, revision: int | None = None) -> int:
        """Compact etcd history up to `revision` (default: now), so older resourceVersions are gone."""
        revision = revision or self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    # -- kubectl -------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout
