"""The one Service route a local node's pods need: ``kubernetes.default`` (the ClusterIP the kubelet
gives every pod as KUBERNETES_SERVICE_HOST/PORT) to the API server on 127.0.0.1, so that an operator or
agent installed from the charts finds the API server with its in-cluster configuration, as in any
cluster.

There is no kube-proxy here: its nftables table and iptables chains have fixed names, and the nodes of
concurrent sessions on one machine would fight over them. Instead each node has its own nftables table,
named after its bridge, with one DNAT rule for packets that come in on that bridge:

1. the bridge is created before containerd (the CNI bridge plugin adopts it) with ``route_localnet``
   set, which lets the kernel route DNATed packets to 127.0.0.1 when they arrive from the bridge;
2. ``table ip <bridge>``: prerouting ``iifname <bridge> ip daddr <ClusterIP> tcp dport 443`` ->
   ``dnat to 127.0.0.1:<port>``; conntrack rewrites the replies back;
3. on stop, the table goes (the bridge goes with the node's network).
"""

from __future__ import annotations

import shutil
import subprocess

KUBERNETES_SERVICE_IP = "10.0.0.1"  # the first address of devcluster.cluster.SERVICE_CIDR
KUBERNETES_SERVICE_PORT = 443


class RouteError(RuntimeError):
    pass


def _run(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RouteError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def ruleset(bridge: str, api_port: int) -> str:
    """The node's nftables table (pure: tested without a kernel)."""
    return (f"table ip {bridge} {{\n"
            f"  chain prerouting {{\n"
            f"    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    iifname \"{bridge}\" ip daddr {KUBERNETES_SERVICE_IP} tcp dport {KUBERNETES_SERVICE_PORT}"
            f" dnat to 127.0.0.1:{api_port}\n"
            f"  }}\n"
            f"}}\n")


def install(bridge: str, api_port: int) -> None:
    """Create the bridge (if need be) with route_localnet, and the node's DNAT table."""
    if _run("ip", "link", "show", bridge, check=False).returncode != 0:
        _run("ip", "link", "add", bridge, "type", "bridge")
    _run("ip", "link", "set", bridge, "up")
    _run("sysctl", "-q", "-w", f"net.ipv4.conf.{bridge}.route_localnet=1")
    remove(bridge)
    _run("nft", "-f", "-", input=ruleset(bridge, api_port))


def remove(bridge: str) -> None:
    if shutil.which("nft") is None:  # no nft (a GPU machine's image): no route was installed either
        return
    _run("nft", "delete", "table", "ip", bridge, check=False)
