"""A kubelet device plugin for the local node: it offers the machine's NVIDIA GPUs as ``nvidia.com/gpu``,
so pods ask for ``resources.limits: {nvidia.com/gpu: 1}`` as on a real cluster.

Stages, in order:

    discover   /dev/nvidia<N> are the GPUs; /dev/nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia-modeset the
               control nodes every GPU container needs; the driver's user-space libraries (libcuda,
               libnvidia-*) and tools (nvidia-smi) are found through ``ldconfig -p`` and the PATH
    serve      a gRPC server (device plugin API v1beta1) on a socket in the kubelet's device-plugins directory
    register   Register with the kubelet's Registration service (kubelet.sock in the same directory)
    share      with ``--replicas N`` each GPU is offered as N devices (``nvidia0::0`` ... ``nvidia0::N-1``), as
               NVIDIA's device plugin does with time-slicing: N pods share one GPU (no isolation of memory
               or compute), which lets one GPU hold a serving pod and its checkpoint and restored copies
    allocate   per container: its GPU's device node and the control nodes (DeviceSpec), the driver's files
               bind-mounted read-only under /usr/local/nvidia (Mount), LD_LIBRARY_PATH and PATH naming them
    re-serve   a restarted kubelet removes every plugin socket: the plugin notices ours is gone, serves and
               registers again

The stubs come from the k8s.io/kubelet Go module's api.proto (``deviceplugin_stubs``); ``allocation`` and
``discover`` are pure (a root directory stands in for ``/``), so the tests run them on fake device nodes.

    python -m dynamo_snapshot.devcluster.gpu_plugin      # --device-plugin-dir /var/lib/kubelet/device-plugins

The kubelet's device-plugin directory is fixed (``/var/lib/kubelet/device-plugins``, not below its
``--root-dir``): on one machine only one kubelet at a time can take device plugins.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

RESOURCE = "nvidia.com/gpu"
# Fixed in the kubelet (pluginapi.DevicePluginPath), whatever its --root-dir: one device-plugin kubelet a machine.
KUBELET_DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
API_VERSION = "v1beta1"
SOCKET_NAME = "dynamo-snapshot-gpu.sock"
KUBELET_SOCKET = "kubelet.sock"
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
DRIVER_LIBRARY = re.compile(r"^lib(cuda|nvidia-[a-z0-9-]+|nvcuvid|nvoptix)\.so(\.\d+)*$")
DRIVER_TOOLS = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced")
CONTAINER_LIB_DIR = "/usr/local/nvidia/lib64"
CONTAINER_BIN_DIR = "/usr/local/nvidia/bin"
SHARE_SEPARATOR = "::"  # a shared GPU's device IDs: <gpu>::<replica>, as NVIDIA's plugin names them


@dataclass(frozen=True)
class Inventory:
    """What the node has: GPU device nodes by ID, the control nodes, the driver's files (host paths)."""

    gpus: dict[str, str]
    control: tuple[str, ...]
    libraries: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    replicas: int = 1  # devices offered per GPU (time-slicing)

    def device_ids(self) -> list[str]:
        """The devices the kubelet is offered: each GPU once, or ``replicas`` times as ``<gpu>::<i>``."""
        if self.replicas <= 1:
            return list(self.gpus)
        return [f"{gpu}{SHARE_SEPARATOR}{i}" for gpu in self.gpus for i in range(self.replicas)]

    def gpu_of(self, device_id: str) -> str | None:
        """The GPU behind an offered device ID, None when this node never offered it."""
        gpu, sep, index = device_id.partition(SHARE_SEPARATOR)
        if gpu not in self.gpus:
            return None
        if self.replicas <= 1:
            return gpu if not sep else None
        return gpu if sep and index.isdigit() and int(index) < self.replicas else None


def discover(root: Path = Path("/"), *, libraries: tuple[str, ...] | None = None,
             tools: tuple[str, ...] | None = None) -> Inventory:
    """The GPUs below ``root``/dev (IDs ``nvidia<N>``), the control nodes present, the driver's files."""
    dev = root / "dev"
    gpus = {p.name: str(p) for p in sorted(dev.glob("nvidia[0-9]*"), key=lambda p: int(p.name[6:]))
            if p.name[6:].isdigit()}
    control = tuple(str(dev / n) for n in CONTROL_NODES if (dev / n).exists())
    return Inventory(gpus, control, driver_libraries() if libraries is None else libraries,
                     driver_tools() if tools is None else tools)


def driver_libraries() -> tuple[str, ...]:
    """The driver's user-space libraries known to the dynamic linker (ldconfig's cache), 64-bit only."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ()
    found: dict[str, str] = {}
    for line in listing.splitlines():
        name, _, path = line.strip().partition(" => ")
        name = name.split(" ", 1)[0]
        if DRIVER_LIBRARY.match(name) and "x86-64" in line and name not in found:
            found[name] = path.strip()
    return tuple(sorted(found.values()))


def driver_tools() -> tuple[str, ...]:
    return tuple(p for p in (shutil.which(t) for t in DRIVER_TOOLS) if p)


def allocation(inventory: Inventory, device_ids: list[str]) -> dict:
    """One container's share: its GPUs' device nodes plus the control nodes, the driver's files, the
    environment naming them. Raises KeyError naming an unknown device ID."""
    unknown = [d for d in device_ids if inventory.gpu_of(d) is None]
    if unknown:
        raise KeyError(f"unknown device IDs {unknown}; this node offers {inventory.device_ids()}")
    gpus = list(dict.fromkeys(inventory.gpu_of(d) for d in device_ids))  # shares of one GPU: its node once
    nodes = [inventory.gpus[g] for g in gpus] + list(inventory.control)
    mounts = [(f"{CONTAINER_LIB_DIR}/{Path(p).name}", p) for p in inventory.libraries]
    mounts += [(f"{CONTAINER_BIN_DIR}/{Path(p).name}", p) for p in inventory.tools]
    envs = {"LD_LIBRARY_PATH": CONTAINER_LIB_DIR, "NVIDIA_VISIBLE_DEVICES": ",".join(gpus),
            **inventory.extra_env}
    if inventory.tools:
        envs["PATH"] = f"{CONTAINER_BIN_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    # inside the container every node is /dev/<name>, wherever the host keeps it (tests: fake nodes)
    return {"devices": [(f"/dev/{Path(n).name}", n, "rw") for n in nodes], "mounts": mounts, "envs": envs}


class _Service:
    """The DevicePlugin service (servicer methods are looked up by name by the generated stubs)."""

    def __init__(self, pb, inventory: Inventory, stop: threading.Event):
        self.pb = pb
        self.inventory = inventory
        self.stop = stop

    def GetDevicePluginOptions(self, request, context):
        return self.pb.DevicePluginOptions()

    def ListAndWatch(self, request, context):
        devices = [self.pb.Device(ID=d, health="Healthy") for d in self.inventory.device_ids()]
        yield self.pb.ListAndWatchResponse(devices=devices)
        while not self.stop.is_set() and context.is_active():
            self.stop.wait(1.0)

    def GetPreferredAllocation(self, request, context):
        return self.pb.PreferredAllocationResponse()

    def Allocate(self, request, context):
        import grpc

        responses = []
        for container in request.container_requests:
            try:
                share = allocation(self.inventory, list(container.devices_ids))
            except KeyError as err:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            responses.append(self.pb.ContainerAllocateResponse(
                envs=share["envs"],
                devices=[self.pb.DeviceSpec(container_path=c, host_path=h, permissions=p)
                         for c, h, p in share["devices"]],
                mounts=[self.pb.Mount(container_path=c, host_path=h, read_only=True) for c, h in share["mounts"]]))
        return self.pb.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request, context):
        return self.pb.PreStartContainerResponse()


class DevicePlugin:
    """Serves ``inventory`` to the kubelet whose device-plugins directory is ``directory``."""

    def __init__(self, directory: Path, inventory: Inventory):
        from dynamo_snapshot.devcluster import deviceplugin_stubs

        self.pb, self.pb_grpc = deviceplugin_stubs.load()
        self.directory = Path(directory)
        self.socket = self.directory / SOCKET_NAME
        self.inventory = inventory
        self.stop_event = threading.Event()
        self.registered = threading.Event()
        self._server = None

    def serve(self) -> None:
        import grpc

        self.socket.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.pb_grpc.add_DevicePluginServicer_to_server(_Service(self.pb, self.inventory, self.stop_event), server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server

    def register(self, timeout: float = 10.0) -> None:
        import grpc

        with grpc.insecure_channel(f"unix://{self.directory / KUBELET_SOCKET}") as channel:
            self.pb_grpc.RegistrationStub(channel).Register(
                self.pb.RegisterRequest(version=API_VERSION, endpoint=SOCKET_NAME, resource_name=RESOURCE,
                                        options=self.pb.DevicePluginOptions()), timeout=timeout)

    def shutdown(self) -> None:
        self.stop_event.set()
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None
        self.socket.unlink(missing_ok=True)

    def run(self) -> None:
        """Serve and register; again whenever the kubelet has removed our socket (it restarted). The
        kubelet offers no event for that: a one-second check of the socket file."""
        while not self.stop_event.is_set():
            if self._server is None or not self.socket.exists():
                if self._server is not None:
                    self._server.stop(grace=0)
                    self._server = None
                if not (self.directory / KUBELET_SOCKET).exists():
                    self.stop_event.wait(1.0)
                    continue
                self.registered.clear()
                self.serve()
                self.register()
                self.registered.set()
                offered = self.inventory.device_ids()
                print(f"registered {RESOURCE} ({len(offered)}: {', '.join(offered)}) "
                      f"with the kubelet at {self.directory}", flush=True)
            self.stop_event.wait(1.0)


def _serve_health(port: int, registered: threading.Event) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if registered.is_set() else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_plugin", description=__doc__.split("\n")[0])
    parser.add_argument("--device-plugin-dir", type=Path, default=Path(KUBELET_DEVICE_PLUGIN_DIR),
                        help="the kubelet's device-plugins directory (fixed in the kubelet)")
    parser.add_argument("--root", type=Path, default=Path("/"), help="where dev/nvidia* are (tests: fake nodes)")
    parser.add_argument("--health-port", type=int, help="serve /healthz on 127.0.0.1 (200 once registered)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="offer each GPU as this many devices (time-slicing: pods share the GPU)")
    parser.add_argument("--no-driver-files", action="store_true", help="hand containers device nodes only")
    args = parser.parse_args(argv)
    inventory = discover(args.root, libraries=() if args.no_driver_files else None,
                         tools=() if args.no_driver_files else None)
    if args.replicas < 1:
        print(f"--replicas: {args.replicas} is not a positive count; 1 offers each GPU once", file=sys.stderr)
        return 2
    inventory = dataclasses.replace(inventory, replicas=args.replicas)
    if not inventory.gpus:
        print(f"no GPUs: no {args.root / 'dev'}/nvidia<N> device nodes", file=sys.stderr)
        return 2
    plugin = DevicePlugin(args.device_plugin_dir, inventory)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: plugin.stop_event.set())
    if args.health_port:
        _serve_health(args.health_port, plugin.registered)
    try:
        plugin.run()
    except KeyboardInterrupt:
        pass
    finally:
        plugin.shutdown()
    return 0


if __name__ == "__main__":
    time.tzset()
    sys.exit(main())
