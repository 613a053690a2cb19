"""CRIU, driven through its command line with every option spelled out.

The agent runs one CRIU build, kept as a *bundle*: the binary, every shared library it links and the
dynamic loader. Started as ``<bundle>/ld.so --library-path <bundle>/lib <bundle>/criu``, it runs in any
mount namespace, so a restore inside a placeholder container uses exactly the CRIU that made the dump
and the placeholder image needs no CRIU of its own. ``hack/build-criu.sh`` builds the bundle, with the
patches of images/criu/patches, into a cache directory keyed by the patch set (``cache_dir``).

Each run keeps CRIU's log (``dump.log`` in the artifact, ``restore.log`` in the restore work
directory); a failure raises ``CriuFailed`` with the log's tail.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import structlog

from dynamo_snapshot.agent.errors import CriuFailed

log = structlog.get_logger(__name__)

BUNDLE_ENV = "DYN_SNAPSHOT_CRIU_BUNDLE"
HUGE_PAGES_ENV = "DYNAMO_CRIU_RESTORE_THP"  # read by images/criu/patches/0001 (criu restore)
HUGE_PAGES = ("image", "force", "off")
DEFAULT_CRIU_VERSION = "4.2.1"
# hack/build-criu.sh's inputs: the patch directory (or "none": stock CRIU) and the build cache.
PATCHES_ENV = "CRIU_PATCHES"
CACHE_ENV = "DYNAMO_SNAPSHOT_CACHE"
REPO_PATCHES = Path(__file__).resolve().parents[3] / "images" / "criu" / "patches"
# Where the agent image installs the bundle; the build cache is the fallback for development and CI.
IMAGE_BUNDLE = Path("/usr/local/lib/dynamo-snapshot/criu")
LOG_TAIL_LINES = 40

# Keys under which external namespaces are recorded in the images and matched at restore.
EXTERNAL_NET_KEY = "extNetNs"
EXTERNAL_PID_KEY = "extPidNs"


def patch_set_key(patches: Path) -> str | None:
    """The key hack/build-criu.sh names a patched build by: the first 12 hex digits of the sha256 of
    the ``sha256sum`` lines of the directory's *.patch files in name order; None when there are none."""
    names = sorted(p.name for p in patches.glob("*.patch")) if patches.is_dir() else []
    if not names:
        return None
    lines = "".join(f"{hashlib.sha256((patches / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def cache_dir(env: Mapping[str, str] | None = None, version: str = DEFAULT_CRIU_VERSION) -> Path:
    """The directory hack/build-criu.sh builds into (and prints) under ``env``: criu-<version>-p<key>
    for the patch set, criu-<version> for stock CRIU (CRIU_PATCHES=none, or no patches)."""
    env = os.environ if env is None else env
    cache = Path(env.get(CACHE_ENV) or Path.home() / ".cache" / "dynamo-snapshot")
    patches = env.get(PATCHES_ENV) or str(REPO_PATCHES)
    key = None if patches == "none" else patch_set_key(Path(patches))
    return cache / (f"criu-{version}-p{key}" if key else f"criu-{version}")


@dataclass(frozen=True)
class CriuBundle:
    path: Path

    @classmethod
    def locate(cls) -> CriuBundle:
        candidates = [Path(p) for p in [os.environ.get(BUNDLE_ENV)] if p]
        candidates += [IMAGE_BUNDLE, cache_dir() / "bundle"]
        for candidate in candidates:
            if (candidate / "criu").is_file() and (candidate / "ld.so").is_file():
                return cls(candidate)
        raise FileNotFoundError(
            f"no CRIU bundle found (looked in {', '.join(map(str, candidates))}); "
            f"run hack/build-criu.sh or set {BUNDLE_ENV}"
        )

    def command(self, bundle_ref: str | None = None) -> list[str]:
        """The argv prefix that runs CRIU; ``bundle_ref`` replaces the bundle's path (e.g. a
        /proc/self/fd/N link to it, valid in another mount namespace)."""
        ref = bundle_ref or str(self.path)
        return [f"{ref}/ld.so", "--library-path", f"{ref}/lib", f"{ref}/criu"]

    def version(self) -> str:
        out = subprocess.run([*self.command(), "--version"], check=True, capture_output=True, text=True).stdout
        match = re.search(r"Version:\s*(\S+)", out)
        if not match:
            raise RuntimeError(f"cannot parse the version of CRIU in {self.path}: {out!r}")
        return match.group(1)


@dataclass(frozen=True)
class CriuSettings:
    """The node-wide CRIU choices an admin makes (the snapshot chart's ``config.criu``)."""

    log_level: int = 4
    tcp_established: bool = True
    network_lock: str = "nftables"  # "" leaves CRIU's default (iptables)
    timeout_s: int = 60
    extra_args: tuple[str, ...] = ()  # appended to every dump and restore command line, as given
    # the project's page-restore patch: MADV_HUGEPAGE on restored VMAs, "image" (the dumped advice),
    # "force" or "off"; "" leaves the patch's default (images/criu/patches/README.md)
    restore_huge_pages: str = ""


@dataclass(frozen=True)
class DumpOptions:
    """``criu dump`` of one process subtree of a container, from the host."""

    pid: int  # host PID of the subtree's root
    images_dir: Path
    # None for a plain process tree in the host's namespaces (agent/tree.py): CRIU freezes it itself.
    freeze_cgroup: Path | None
    net_ns_inode: int | None
    pid_ns_inode: int | None
    external_mounts: Mapping[str, str]  # mountpoint in the container -> key in the images
    log_file: str = "dump.log"
    log_level: int = 4
    # The agent thaws (or kills) the workload itself once the rootfs diff is captured.
    leave_running: bool = True
    tcp_established: bool = True
    # A connection still in a listener's accept queue cannot be dumped; dropping it is what a
    # client of a restarting worker sees anyway.
    skip_in_flight: bool = True
    file_locks: bool = True
    network_lock: str = "nftables"
    manage_cgroups: str = "ignore"
    ghost_limit_bytes: int = 64 << 20
    timeout_s: int = 60
    extra_args: tuple[str, ...] = ()
    # CRIU's plugin directory: the bundle's (empty) one, so a host's CRIU CUDA plugin never runs
    # cuda-checkpoint on processes the agent's CUDA step has already checkpointed.
    libdir: str | None = None

    @classmethod
    def configured(cls, settings: CriuSettings, **fields: object) -> DumpOptions:
        return cls(log_level=settings.log_level, tcp_established=settings.tcp_established,
                   network_lock=settings.network_lock, timeout_s=settings.timeout_s,
                   extra_args=settings.extra_args, **fields)  # type: ignore[arg-type]

    def argv(self) -> list[str]:
        args = [
            "dump",
            "--tree",
            str(self.pid),
            "--images-dir",
            str(self.images_dir),
            "--log-file",
            self.log_file,
            f"-v{self.log_level}",
            *(["--freeze-cgroup", str(self.freeze_cgroup)] if self.freeze_cgroup is not None else []),
            *(["--external", f"net[{self.net_ns_inode}]:{EXTERNAL_NET_KEY}"] if self.net_ns_inode is not None else []),
            *(["--external", f"pid[{self.pid_ns_inode}]:{EXTERNAL_PID_KEY}"] if self.pid_ns_inode is not None else []),
            *(["--network-lock", self.network_lock] if self.network_lock else []),
            *(["--libdir", self.libdir] if self.libdir else []),
            f"--manage-cgroups={self.manage_cgroups}",  # optional argument: must be attached
            "--ghost-limit",
            str(self.ghost_limit_bytes),
            "--timeout",
            str(self.timeout_s),
        ]
        for mountpoint, key in sorted(self.external_mounts.items()):
            args += ["--external", f"mnt[{mountpoint}]:{key}"]
        if self.leave_running:
            args.append("--leave-running")
        if self.tcp_established:
            args.append("--tcp-established")
        if self.skip_in_flight:
            args.append("--skip-in-flight")
        if self.file_locks:
            args.append("--file-locks")
        return [*args, *self.extra_args]


@dataclass(frozen=True)
class RestoreOptions:
    """``criu restore`` run inside the placeholder's namespaces. Paths are as CRIU sees them there,
    so directories and namespaces on the host are passed as /proc/self/fd/N links."""

    images_dir: str
    work_dir: str
    pid_ns_fd: int | None  # None: a plain process tree restored into the host's namespaces
    net_ns_fd: int | None
    external_mounts: Mapping[str, str]  # key in the images -> path in the placeholder
    inherited_fds: Mapping[str, int] = field(default_factory=dict)  # resource ("pipe:[123]") -> fd
    join_namespaces: Mapping[str, str] = field(default_factory=dict)  # "uts" -> "/proc/1/ns/uts"
    log_file: str = "restore.log"
    log_level: int = 4
    pidfile: str = "restored.pid"
    root: str | None = "/"
    tcp_close: bool = True
    file_locks: bool = True
    manage_cgroups: str = "ignore"
    timeout_s: int = 60
    extra_args: tuple[str, ...] = ()
    libdir: str | None = None  # see DumpOptions.libdir
    huge_pages: str = ""  # CriuSettings.restore_huge_pages

    @classmethod
    def configured(cls, settings: CriuSettings, **fields: object) -> RestoreOptions:
        return cls(log_level=settings.log_level, timeout_s=settings.timeout_s, extra_args=settings.extra_args,
                   huge_pages=settings.restore_huge_pages, **fields)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """The environment of ``criu restore`` beyond the agent's own (the patch's knobs)."""
        return {HUGE_PAGES_ENV: self.huge_pages} if self.huge_pages else {}

    @classmethod
    def on_host(cls, settings: CriuSettings, images_dir: str, work_dir: str, libdir: str | None) -> RestoreOptions:
        """A plain process tree restored into the host's namespaces, with the host's root."""
        return cls.configured(settings, images_dir=images_dir, work_dir=work_dir, pid_ns_fd=None, net_ns_fd=None,
                              external_mounts={}, root=None, libdir=libdir)

    def argv(self) -> list[str]:
        args = [
            "restore",
            "--images-dir",
            self.images_dir,
            "--work-dir",
            self.work_dir,
            "--log-file",
            self.log_file,
            f"-v{self.log_level}",
            *(["--root", self.root] if self.root is not None else []),
            "--restore-detached",
            "--pidfile",
            self.pidfile,
            *(["--inherit-fd", f"fd[{self.pid_ns_fd}]:{EXTERNAL_PID_KEY}"] if self.pid_ns_fd is not None else []),
            *(["--inherit-fd", f"fd[{self.net_ns_fd}]:{EXTERNAL_NET_KEY}"] if self.net_ns_fd is not None else []),
            *(["--libdir", self.libdir] if self.libdir else []),
            f"--manage-cgroups={self.manage_cgroups}",  # optional argument: must be attached
            "--timeout",
            str(self.timeout_s),
        ]
        for key, path in sorted(self.external_mounts.items()):
            args += ["--external", f"mnt[{key}]:{path}"]
        for resource, fd in sorted(self.inherited_fds.items()):
            args += ["--inherit-fd", f"fd[{fd}]:{resource}"]
        for ns, path in sorted(self.join_namespaces.items()):
            args += ["--join-ns", f"{ns}:{path}"]
        if self.tcp_close:
            args.append("--tcp-close")
        if self.file_locks:
            args.append("--file-locks")
        return [*args, *self.extra_args]


def log_tail(path: Path | None, stderr: bytes, lines: int = LOG_TAIL_LINES) -> str:
    text = ""
    if path is not None:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
    text = "\n".join(text.splitlines()[-lines:])
    extra = stderr.decode(errors="replace").strip()
    return "\n".join(part for part in (text, extra) if part) or "(CRIU wrote no log)"


async def run(
    action: str,
    argv: Sequence[str],
    log_path: Path | None,
    pass_fds: Sequence[int] = (),
    on_started: Callable[[int], Awaitable[None]] | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a CRIU command line (possibly behind wrappers such as nsenter) and raise ``CriuFailed``
    with the log's tail if it fails. ``on_started`` gets the PID of the spawned process; ``env`` is
    added to the agent's environment."""
    log.info("criu starting", action=action, argv=" ".join(argv), **({"env": dict(env)} if env else {}))
    environment = {**os.environ, **env} if env else None
    async with await anyio.open_process(argv, stdin=subprocess.DEVNULL, pass_fds=pass_fds,
                                        env=environment) as process:
        if on_started is not None:
            await on_started(process.pid)
        stderr = b""
        assert process.stderr is not None and process.stdout is not None
        async with anyio.create_task_group() as tg:

            async def drain_stdout() -> None:
                async for _ in process.stdout:  # type: ignore[union-attr]
                    pass

            tg.start_soon(drain_stdout)
            async for chunk in process.stderr:
                stderr += chunk
        returncode = await process.wait()
    if returncode != 0:
        raise CriuFailed(action, returncode, log_tail(log_path, stderr), str(log_path) if log_path else None)
    log.info("criu finished", action=action)
