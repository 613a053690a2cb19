"""Where the cluster is and who we are: a kubeconfig file, `KUBECONFIG`, or the in-cluster service account.

The order is controller-runtime's: an explicit path, then `KUBECONFIG` (a list of files, merged with the
first one winning), then the in-cluster service account, then `~/.kube/config`.

Credentials supported: client certificates (file or `-data`), bearer tokens (`token`, `tokenFile`, the
rotated service-account token, re-read every minute), and `exec` plugins that print a token
(`client.authentication.k8s.io` ExecCredential; cached until it expires or the server answers 401).
Legacy `auth-provider` entries and exec plugins that return certificates are refused with a ConfigError.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import yaml

from dynamo_snapshot.kube.errors import ConfigError

__all__ = ["SERVICE_ACCOUNT_DIR", "ClusterConfig", "ExecConfig", "load_config", "load_in_cluster", "load_kubeconfig"]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TOKEN_FILE_TTL = 60.0


@dataclass(frozen=True)
class ExecConfig:
    """A kubeconfig `user.exec` credential plugin."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"
    cwd: str | None = None


@dataclass
class ClusterConfig:
    server: str
    ca_data: bytes | None = None  # PEM
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    client_cert_data: bytes | None = None  # PEM
    client_key_data: bytes | None = None  # PEM
    token: str | None = None
    token_file: Path | None = None
    exec: ExecConfig | None = None
    namespace: str = "default"
    source: str = ""  # where it came from, for messages
    _cached_token: tuple[str, float] | None = field(default=None, init=False, repr=False)

    # -- TLS -----------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        if self.insecure_skip_tls_verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_data:
            context = ssl.create_default_context(cadata=self.ca_data.decode())
        else:
            context = ssl.create_default_context()
        if self.client_cert_data and self.client_key_data:
            # The ssl module loads key pairs only from files: write them to a private temporary directory.
            with tempfile.TemporaryDirectory(prefix="kube-cert-") as tmp:
                cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
                for path, data in ((cert, self.client_cert_data), (key, self.client_key_data)):
                    path.touch(mode=0o600)
                    path.write_bytes(data)
                context.load_cert_chain(str(cert), str(key))
        return context

    # -- bearer tokens ---------------------------------------------------------------------------------
    async def authorization(self) -> str | None:
        """The value of the Authorization header, or None (client certificates only)."""
        token = await self._bearer_token()
        return f"Bearer {token}" if token else None

    def invalidate_token(self) -> None:
        """Forget a cached token (the server answered 401): the next request reads or execs it again."""
        self._cached_token = None

    async def _bearer_token(self) -> str | None:
        if self.token:
            return self.token
        now = time.monotonic()
        if self._cached_token and self._cached_token[1] > now:
            return self._cached_token[0]
        if self.token_file:
            token = (await anyio.Path(self.token_file).read_text()).strip()
            self._cached_token = (token, now + _TOKEN_FILE_TTL)
            return token
        if self.exec:
            token, expires_in = await _run_exec(self.exec, self.server)
            self._cached_token = (token, now + expires_in)
            return token
        return None


async def _run_exec(spec: ExecConfig, server: str) -> tuple[str, float]:
    info = {"apiVersion": spec.api_version, "kind": "ExecCredential",
            "spec": {"interactive": False, "cluster": {"server": server}}}
    env = {**os.environ, **dict(spec.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
    try:
        result = await anyio.run_process([spec.command, *spec.args], env=env, cwd=spec.cwd, check=False)
    except OSError as err:
        raise ConfigError(f"exec credential plugin {spec.command!r} could not run: {err}") from err
    if result.returncode != 0:
        raise ConfigError(f"exec credential plugin {spec.command!r} exited {result.returncode}: "
                          f"{result.stderr.decode(errors='replace').strip()[:500]}")
    try:
        status = json.loads(result.stdout)["status"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"exec credential plugin {spec.command!r} printed no ExecCredential status") from err
    token = status.get("token")
    if not token:
        raise ConfigError(f"exec credential plugin {spec.command!r} returned no token "
                          "(client-certificate credentials from plugins are not supported)")
    expires_in = 300.0
    if stamp := status.get("expirationTimestamp"):
        expiry = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        expires_in = max(0.0, expiry.timestamp() - time.time() - 10.0)
    return token, expires_in


# -- kubeconfig ----------------------------------------------------------------------------------------
def _named(entries: list[dict[str, Any]] | None, kind: str) -> dict[str, dict[str, Any]]:
    return {e["name"]: e.get(kind) or {} for e in entries or []
            if isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get(kind) or {}, dict)}


def _merge(files: list[Path]) -> tuple[dict[str, Any], dict[Path, Path]]:
    """Merge kubeconfig files, first one winning; also which file each entry came from (for relative paths)."""
    merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}, "current-context": ""}
    origin: dict[str, Path] = {}
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read kubeconfig {path}: {err}") from err
        except RecursionError:
            raise ConfigError(f"kubeconfig {path} is nested too deeply") from None
        if not isinstance(doc, dict) or any(not isinstance(doc.get(k) or [], list) for k in ("clusters", "users",
                                                                                            "contexts")):
            raise ConfigError(f"kubeconfig {path} is not a kubeconfig (a mapping with clusters, users and "
                              "contexts lists)")
        if not isinstance(doc.get("current-context") or "", str):
            raise ConfigError(f"kubeconfig {path}: current-context must be a string")
        if not merged["current-context"] and doc.get("current-context"):
            merged["current-context"] = doc["current-context"]
        for kind, singular in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for name, value in _named(doc.get(kind), singular).items():
                if name not in merged[kind]:
                    merged[kind][name] = value
                    origin[f"{kind}/{name}"] = path
    return merged, origin  # type: ignore[return-value]


def _read_data(entry: dict[str, Any], key: str, base: Path) -> bytes | None:
    if data := entry.get(f"{key}-data"):
        return base64.b64decode(data)
    if path := entry.get(key):
        full = Path(path) if os.path.isabs(path) else base / path
        try:
            return full.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read {key} {full}: {err}") from err
    return None


def load_kubeconfig(path: str | os.PathLike[str] | list[Path] | None = None, *,
                    context: str | None = None) -> ClusterConfig:
    """A ClusterConfig from one kubeconfig file (or a KUBECONFIG-style list of them)."""
    if path is None:
        env = os.environ.get("KUBECONFIG")
        files = [Path(p) for p in env.split(os.pathsep) if p] if env else [Path.home() / ".kube" / "config"]
    elif isinstance(path, list):
        files = path
    else:
        files = [Path(path)]
    if not any(f.exists() for f in files):
        raise ConfigError(f"no kubeconfig at {os.pathsep.join(map(str, files))}")
    merged, origin = _merge(files)
    context_name = context or merged["current-context"]
    if not context_name:
        raise ConfigError(f"kubeconfig {files[0]} has no current-context; pass a context")
    ctx = merged["contexts"].get(context_name)
    if ctx is None:
        raise ConfigError(f"kubeconfig {files[0]}: context {context_name!r} not found")
    cluster_name, user_name = ctx.get("cluster", ""), ctx.get("user", "")
    cluster = merged["clusters"].get(cluster_name)
    if cluster is None or not cluster.get("server"):
        raise ConfigError(f"kubeconfig {files[0]}: cluster {cluster_name!r} of context {context_name!r} "
                          "not found or has no server")
    user = merged["users"].get(user_name, {})
    cluster_base = origin.get(f"clusters/{cluster_name}", files[0]).parent
    user_base = origin.get(f"users/{user_name}", files[0]).parent
    if user.get("auth-provider"):
        raise ConfigError(f"kubeconfig user {user_name!r}: auth-provider is not supported; use an exec plugin")
    exec_spec = None
    if raw_exec := user.get("exec"):
        exec_spec = ExecConfig(
            command=raw_exec["command"],
            args=tuple(raw_exec.get("args") or ()),
            env=tuple((e["name"], e["value"]) for e in raw_exec.get("env") or ()),
            api_version=raw_exec.get("apiVersion", "client.authentication.k8s.io/v1"),
            cwd=str(user_base),
        )
    token_file = user.get("tokenFile")
    return ClusterConfig(
        server=cluster["server"].rstrip("/"),
        ca_data=_read_data(cluster, "certificate-authority", cluster_base),
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=cluster.get("tls-server-name"),
        client_cert_data=_read_data(user, "client-certificate", user_base),
        client_key_data=_read_data(user, "client-key", user_base),
        token=user.get("token"),
        token_file=(user_base / token_file) if token_file else None,
        exec=exec_spec,
        namespace=ctx.get("namespace") or "default",
        source=f"kubeconfig {files[0]} context {context_name}",
    )


def load_in_cluster(directory: Path = SERVICE_ACCOUNT_DIR) -> ClusterConfig:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, its CA, and its (rotated) token file."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token_file = directory / "token"
    if not host or not port or not token_file.exists():
        raise ConfigError("not running in a cluster (no KUBERNETES_SERVICE_HOST or service-account token)")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    namespace_file = directory / "namespace"
    ca_file = directory / "ca.crt"
    return ClusterConfig(
        server=f"https://{host}:{port}",
        ca_data=ca_file.read_bytes() if ca_file.exists() else None,
        token_file=token_file,
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else "default",
        source="in-cluster service account",
    )


def load_config(kubeconfig: str | os.PathLike[str] | None = None, *, context: str | None = None) -> ClusterConfig:
    """The cluster configuration: explicit kubeconfig, KUBECONFIG, in-cluster, then ~/.kube/config."""
    if kubeconfig is not None:
        return load_kubeconfig(kubeconfig, context=context)
    if os.environ.get("KUBECONFIG"):
        return load_kubeconfig(None, context=context)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT_DIR / "token").exists():
        return load_in_cluster()
    default = Path.home() / ".kube" / "config"
    if default.exists():
        return load_kubeconfig(default, context=context)
    raise ConfigError("no cluster configuration: pass a kubeconfig, set KUBECONFIG, run in a pod, "
                      "or create ~/.kube/config")
