"""The lab network: one bridge in the machine's own namespace, one network namespace per
host joined to it by a veth pair. Everything through ``ip`` (iproute2).

Over it, the VM network of a cluster whose VMs are placed on hosts (docs/hosts.md, "The
VM network across hosts"): the cluster's VM bridge on the lab (``tblab<tag>``) gets one
VXLAN port per host (:func:`add_segment_port`, a VNI of its own per host and cluster),
whose other end is in that host's namespace on a bridge of the same name that the
placed VMs' lab NICs join (:meth:`testbed.hosts.placement.PlacedHost.join_vm_segment`):
one layer-2 segment, a star through the lab's bridge (which forwards between its
ports; a VXLAN device never forwards back out of itself).

The lab never touches an interface or namespace it did not make: a bridge that exists
before ``up`` and is not recorded as ours is refused, and so is a subnet that already
has an address on another interface of this machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path

from testbed.hosts.layout import HostsError

__all__ = [
    "VXLAN_PORT",
    "add_bridge",
    "add_host_link",
    "add_segment_port",
    "bridge_exists",
    "delete_link",
    "delete_links",
    "delete_netns",
    "netns_exists",
    "netns_pids",
    "scratch_network",
    "subnet_in_use",
]

IP_TIMEOUT_S = 15.0
VXLAN_PORT = 4789  # IANA's; the kernel shares one UDP socket among the VNIs
_SYS_NET = Path("/sys/class/net")
_NETNS_DIR = Path("/run/netns")


def _ip(*args: str) -> str:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True,
                             timeout=IP_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise HostsError("`ip` (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise HostsError(f"`ip {' '.join(args)}` did not finish in {IP_TIMEOUT_S:.0f} s") from None
    if res.returncode != 0:
        raise HostsError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()[-300:]} "
                         "(the hosts lab needs root: network namespaces and bridges)")
    return res.stdout


def bridge_exists(name: str) -> bool:
    return (_SYS_NET / name).exists()


def netns_exists(name: str) -> bool:
    return (_NETNS_DIR / name).exists()


def subnet_in_use(subnet: ipaddress.IPv4Network, except_on: str) -> str | None:
    """An interface (other than ``except_on``) with an address in ``subnet``, if any."""
    for link in json.loads(_ip("-j", "addr", "show") or "[]"):
        if link.get("ifname") == except_on:
            continue
        for info in link.get("addr_info", []):
            if info.get("family") != "inet":
                continue
            network = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            if network.overlaps(subnet):
                return f"{link.get('ifname')} ({info['local']}/{info['prefixlen']})"
    return None


def scratch_network(tag: str) -> tuple[str, str]:
    """A bridge name of this process and a free /24 in 10.213.100-249.0 for a short-lived
    lab (the tests, the attack lab): never the default lab's bridge or subnet."""
    bridge = f"{tag}{os.getpid() % 100000}"
    for third in range(100 + os.getpid() % 50, 250):
        subnet = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if subnet_in_use(subnet, except_on=bridge) is None:
            return bridge, str(subnet)
    raise HostsError("no free /24 in 10.213.100.0-10.213.249.0 for a scratch lab")


def add_bridge(name: str, address: str, prefixlen: int) -> None:
    _ip("link", "add", name, "type", "bridge")
    _ip("addr", "add", f"{address}/{prefixlen}", "dev", name)
    _ip("link", "set", name, "up")


def add_host_link(bridge: str, netns: str, veth: str, address: str, prefixlen: int) -> None:
    """A namespace ``netns`` whose ``eth0`` (``address``) is one end of ``veth`` on ``bridge``."""
    if not netns_exists(netns):
        _ip("netns", "add", netns)
    if not (_SYS_NET / veth).exists():
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _ip("link", "set", veth, "master", bridge, "up")
    _ip("-n", netns, "addr", "replace", f"{address}/{prefixlen}", "dev", "eth0")
    _ip("-n", netns, "link", "set", "eth0", "up")
    _ip("-n", netns, "link", "set", "lo", "up")


def netns_pids(netns: str) -> list[int]:
    """Every process in ``netns`` (ssh sessions, helpers: what ``down`` must not leave)."""
    if not netns_exists(netns):
        return []
    return [int(p) for p in _ip("netns", "pids", netns).split()]


def delete_link(name: str) -> bool:
    if not (_SYS_NET / name).exists():
        return False
    _ip("link", "del", name)
    return True


def delete_netns(name: str) -> bool:
    if not netns_exists(name):
        return False
    _ip("netns", "del", name)
    return True


def add_segment_port(device: str, vni: int, local: str, remote: str, underlay: str,
                     bridge: str) -> None:
    """The lab's end of a host's part of a VM segment: ``device``, a VXLAN (``vni``) from
    ``local`` to ``remote`` over ``underlay`` (the lab bridge), a port of ``bridge``
    (made again if it exists: the host may have another address now)."""
    delete_link(device)
    _ip("link", "add", device, "type", "vxlan", "id", str(vni), "local", local,
        "remote", remote, "dstport", str(VXLAN_PORT), "dev", underlay)
    with open(f"/proc/sys/net/ipv6/conf/{device}/disable_ipv6", "w") as knob:
        knob.write("1\n")  # the lab speaks nothing on the VM segment
    _ip("link", "set", device, "master", bridge, "up")


def delete_links(prefix: str) -> list[str]:
    """Every link whose name starts with ``prefix`` (this cluster's segment ports)."""
    gone = [p.name for p in sorted(_SYS_NET.glob(f"{prefix}*")) if delete_link(p.name)]
    return gone
