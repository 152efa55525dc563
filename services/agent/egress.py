"""Outbound network for ``--network egress`` instances, never to the platform.

An instance always starts in a network namespace of its own with only its loopback
(:mod:`services.agent.namespaces`). When a function with ``network=egress`` is loaded into one, the
agent gives that namespace a way out:

* a veth pair: ``sk<uid>`` on the host with ``10.200.x.1/30``, its peer moved into the instance's
  namespace as ``eth0`` with ``10.200.x.2/30`` and a default route (one /30 per instance uid, so
  addresses are unique on the host because uids are);
* on the host, once per agent: ``net.ipv4.ip_forward=1`` and an nftables table
  ``inet stoker-<platform>-<node>-<agent pid>`` (one per agent, so no agent's stop removes what another
  agent's instances rely on; every table covers every instance interface, so they only add up) that

  - rejects everything from an instance interface to the host itself (every port of every host
    address: the broker, the gateway, the agent, anything else running on the node),
  - rejects forwarding between instance interfaces (no instance reaches another),
  - rejects forwarding to the denied ranges: loopback, link-local (cloud metadata), the private
    ranges the platform's own services live on in any cluster, multicast, and the broker's
    resolved addresses plus ``STOKER_EGRESS_DENY``,
  - rejects new connections from outside into instances (replies only),
  - masquerades what leaves, so replies come back to the host.

No IPv6: instances get no v6 address or route, and the table drops v6 from their interfaces.
A reset removes the pair before the instance goes back to the generic pool; a dead instance's pair
goes with its namespace. Needs ``ip`` (iproute2) and ``nft`` (Debian's ``nftables``, which
``make setup`` installs).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable

__all__ = ["DEFAULT_DENY", "INSTANCE_NET", "Egress", "EgressUnavailable"]

log = logging.getLogger("stoker.agent.egress")

INSTANCE_NET = ipaddress.ip_network("10.200.0.0/16")
"""Where instance links are numbered: the /30 at index (uid - first uid of the range)."""
DEFAULT_DENY = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)
"""Never reachable by egress: the ranges a platform's own services (and cloud metadata) live on."""
IFACE_PREFIX = "sk"


class EgressUnavailable(Exception):
    """This node cannot give egress (a tool or a kernel feature is missing); the reason says which."""


def _run(argv: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv[:3])}: {(done.stderr or done.stdout).strip()}")


def _resolve(hosts: Iterable[str]) -> list[str]:
    found = set()
    for host in hosts:
        try:
            for info in socket.getaddrinfo(host, None, socket.AF_INET):
                found.add(str(info[4][0]))
        except OSError:
            continue
    return sorted(found)


def ruleset(table: str, deny: Iterable[str]) -> str:
    """The nftables table (pure: tested on its own)."""
    ifaces = f'"{IFACE_PREFIX}*"'
    elements = ", ".join(sorted(set(deny)))
    return f"""table inet {table} {{
  set deny4 {{
    type ipv4_addr; flags interval; auto-merge
    elements = {{ {elements} }}
  }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {ifaces} ct state established,related accept
    iifname {ifaces} reject with icmpx admin-prohibited
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname {ifaces} meta nfproto ipv6 drop
    iifname {ifaces} oifname {ifaces} reject with icmpx admin-prohibited
    iifname {ifaces} ip daddr @deny4 reject with icmpx admin-prohibited
    oifname {ifaces} ct state established,related accept
    oifname {ifaces} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr {INSTANCE_NET} oifname != {ifaces} masquerade
  }}
}}
"""


def remove_dead_tables() -> list[str]:
    """Tables of agents that died without removing theirs (their instances, and links, died too)."""
    listed = subprocess.run(["nft", "list", "tables", "inet"], capture_output=True, text=True, timeout=30)
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split()[-1] if line.startswith("table inet stoker-") else ""
        pid = name.rsplit("-", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, timeout=30)
            removed.append(name)
    if removed:
        log.warning("removed the nftables tables of agents that are gone: %s", removed)
    return removed


class Egress:
    """The host side of egress for one agent (its nftables table), and the links of its instances."""

    def __init__(self, table: str, uids: range, deny: Iterable[str]) -> None:
        self.table, self.uids, self.deny = table, uids, list(deny)

    @classmethod
    def setup(cls, table: str, uids: range, broker_hosts: Iterable[str], extra_deny: Iterable[str]) -> Egress:
        """Forwarding on, the table ``<table>-<pid>`` in place (dead agents' tables removed);
        raises EgressUnavailable."""
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise EgressUnavailable(f"`{tool}` is not installed on this node (apt-get install "
                                        f"{'iproute2' if tool == 'ip' else 'nftables'})")
        if len(uids) * 4 > INSTANCE_NET.num_addresses:
            raise EgressUnavailable(f"{len(uids)} instance uids do not fit {INSTANCE_NET} (a /30 each)")
        deny = [*DEFAULT_DENY, *_resolve(broker_hosts), *(d.strip() for d in extra_deny if d.strip())]
        for net in deny:
            ipaddress.ip_network(net, strict=False)  # a bad STOKER_EGRESS_DENY entry fails here
        egress = cls(f"{table}-{os.getpid()}", uids, deny)
        try:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as fh:
                fh.write("1")  # host-wide; the table above confines what instances may forward
            remove_dead_tables()
            _run(["nft", "-f", "-"], ruleset(egress.table, deny))
        except OSError as exc:
            raise EgressUnavailable(f"cannot set up forwarding and nftables: {exc}") from exc
        return egress

    def addresses(self, uid: int) -> tuple[str, str]:
        """(host side, instance side) of ``uid``'s link."""
        index = self.uids.index(uid)
        base = int(INSTANCE_NET.network_address) + 4 * index
        return str(ipaddress.ip_address(base + 1)), str(ipaddress.ip_address(base + 2))

    @staticmethod
    def iface(uid: int) -> str:
        return f"{IFACE_PREFIX}{uid}"

    def connect(self, uid: int, pid: int) -> None:
        """Give the namespace of process ``pid`` (the instance) its link out: two commands, ~5 ms."""
        host_ip, inst_ip = self.addresses(uid)
        host, peer = self.iface(uid), f"{self.iface(uid)}p"
        self.disconnect(uid)
        _run(["ip", "-batch", "-"], f"link add {host} type veth peer name {peer}\n"
             f"link set {peer} netns {pid}\naddr add {host_ip}/30 dev {host}\nlink set {host} up\n")
        _run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-batch", "-"],
             f"link set {peer} name eth0\naddr add {inst_ip}/30 dev eth0\nlink set eth0 up\n"
             f"route add default via {host_ip}\n")

    def disconnect(self, uid: int) -> None:
        """Remove ``uid``'s link (both ends), if there is one."""
        subprocess.run(["ip", "link", "del", self.iface(uid)], capture_output=True, timeout=30)

    def close(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=30)
