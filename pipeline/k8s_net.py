"""The pods' network in `sae k8s simulate`: a network namespace per index, or loopback ports.

netns (root, `ip`, `unshare`): a bridge `saeb<tag>`, per index a namespace `sae-<tag>-<i>`
joined to it by a veth pair, with address <subnet>.(10+i), and /etc/netns/<ns>/hosts, which
`ip netns exec` mounts over /etc/hosts: every pod's `<job>-<i>.<service>[.<ns>.svc
[.cluster.local]]` name, and the pod's own `<job>-<i>`. `unshare --uts` gives each pod its
hostname. Everything is removed when the Job ends. loopback: no names resolve; every pod gets
SAE_WORKER_HOSTS (trainer/cluster.py) with one 127.0.0.1 port per index instead.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from preprocessing.errors import UserError

if TYPE_CHECKING:
    from pipeline.k8s_sim import JobSpec, PodPlan


@dataclass(frozen=True)
class Network:
    """Where pod `index` runs: a namespace (netns mode) and its address."""

    mode: str  # netns, loopback, or host (a Job without a headless Service)
    namespaces: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    worker_hosts: str | None = None  # loopback: SAE_WORKER_HOSTS

    def wrap(self, plan: PodPlan) -> list[str]:
        if self.mode != "netns":
            return list(plan.argv)
        # ip netns exec: the namespace, and /etc/netns/NS/hosts over /etc/hosts; unshare
        # --uts: the pod's own hostname.
        return ["ip", "netns", "exec", self.namespaces[plan.index], "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', plan.hostname, *plan.argv]  # fmt: skip


def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("unshare")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


def hosts_file(spec: JobSpec, addresses: Sequence[str], index: int) -> str:
    """/etc/hosts of pod `index`: every pod's Service names, its own short name too."""
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    for i, address in enumerate(addresses):
        host = f"{spec.name}-{i}"
        service = f"{host}.{spec.subdomain}"
        ns = spec.namespace
        names = [f"{service}.{ns}.svc.cluster.local", f"{service}.{ns}.svc", service]
        if i == index:
            names.append(host)
        lines.append(f"{address} {' '.join(names)}")
    return "\n".join(lines) + "\n"


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def network(spec: JobSpec, mode: str, say: Callable[[str], None]) -> Iterator[Network]:
    """The pods' network for the life of the Job; namespaces, links and files are removed after."""
    if not spec.subdomain:
        yield Network("host")
        return
    if mode == "auto":
        mode = "netns" if netns_available() else "loopback"
    n = spec.completions
    if mode == "loopback":
        hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(n))
        say(f"{spec.name}: network loopback: the Service's host names do not resolve here; "
            f"every pod gets SAE_WORKER_HOSTS={hosts}, so TF_CONFIG names these ports, not "
            f"<job>-<index>.{spec.subdomain}")  # fmt: skip
        yield Network("loopback", worker_hosts=hosts)
        return
    if not netns_available():
        raise UserError("--network netns needs root, `ip` and `unshare`; use --network loopback")
    tag = secrets.token_hex(3)
    bridge, subnet = f"saeb{tag}", f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    namespaces = tuple(f"sae-{tag}-{i}" for i in range(n))
    addresses = tuple(f"{subnet}.{10 + i}" for i in range(n))
    created: list[str] = []
    veths: list[str] = []
    try:
        _ip("link", "add", "name", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(namespaces):
            _ip("netns", "add", ns)
            created.append(ns)
            host_end, pod_end = f"sv{tag}{i}h", f"sv{tag}{i}p"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
            veths.append(host_end)
            _ip("link", "set", host_end, "master", bridge, "up")
            _ip("link", "set", pod_end, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addresses[i]}/24", "dev", pod_end)
            _ip("-n", ns, "link", "set", pod_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file(spec, addresses, i))
        say(f"{spec.name}: network netns: bridge {bridge}, pods at {', '.join(addresses)}")
        yield Network("netns", namespaces, addresses)
    finally:
        # Deleted explicitly: a namespace's veth pairs otherwise go away only some time later.
        for veth in veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
