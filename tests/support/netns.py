"""Separate hosts on one machine: a network namespace per host, each with its own address on
a bridge, so services reach each other only over a real link that a test can cut.

    with Network(["scheduler", "decode-a"]) as net:
        proc = net.popen("decode-a", [sys.executable, "-m", "pdmesh.cli", "decode", ...])
        net.address("decode-a")   # "10.213.0.2"
        net.cut("decode-a")       # its link goes down: packets are dropped, nothing is reset
        net.heal("decode-a")

Layout: bridge `pdm-<pid>-br` in the root namespace holds 10.213.N.254/24, so this process (the
test client) reaches every host; host i is namespace `pdm-<pid>-<i>` with `eth0` = 10.213.N.<i+1>
and `lo` up, joined to the bridge by the veth `pdm-<pid>-<i>`. No host gets a default route: the
only other addresses anyone can reach are the test's own. N is the first /24 of 10.213.0.0/16
no interface here uses yet.

Every name carries the creating pid, so a new Network first deletes what a crashed run (a pid
no longer alive) left behind, and never touches another live run's hosts. Needs root and iproute2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "pdm-"
SUBNETS = ipaddress.ip_network("10.213.0.0/16")
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")


class NetnsUnavailable(RuntimeError):
    """This machine cannot make namespaces (not root, no iproute2, no netns support)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs these tests as root)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def delete_leftovers() -> list[str]:
    """Delete namespaces and links of runs whose pid is gone; returns their names."""
    deleted = []
    for ns in _names(ip("netns", "list").stdout):
        if _dead_owner(ns):
            _kill_pids(ns)
            ip("netns", "del", ns, check=False)
            deleted.append(ns)
    for link in _names(ip("-o", "link", "show").stdout, field=1):
        if _dead_owner(link):
            ip("link", "del", link, check=False)
            deleted.append(link)
    return deleted


def _names(listing: str, field: int = 0) -> list[str]:
    """First (or `field`-th) word of each line, without `ip -o link`'s ':' and '@peer' tails."""
    words = (line.split() for line in listing.splitlines())
    return [w[field].rstrip(":").split("@")[0] for w in words if len(w) > field]


def _dead_owner(name: str) -> bool:
    match = _OWNED.match(name)
    return bool(match) and not Path(f"/proc/{match.group(1)}").exists()


def _kill_pids(ns: str) -> None:
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_subnet() -> ipaddress.IPv4Network:
    used = {ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", ip("-4", "addr").stdout)}
    for subnet in SUBNETS.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise NetnsUnavailable(f"every /24 of {SUBNETS} is in use")


class Network:
    """A bridge and one namespace per host name; `close()` (or leaving `with`) removes them all."""

    def __init__(self, hosts: list[str]):
        self.owner = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.owner}-br"
        self.hosts = list(hosts)
        self.procs: list[subprocess.Popen] = []
        delete_leftovers()
        self.subnet = _free_subnet()
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def namespace(self, host: str) -> str:
        return f"{self.owner}-{self.hosts.index(host)}"

    def address(self, host: str) -> str:
        """The host's own IPv4 address, e.g. "10.213.0.3"."""
        return str(self.subnet[self.hosts.index(host) + 1])

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (where test clients come from)."""
        return str(self.subnet[254])

    def _veth(self, host: str) -> str:
        return self.namespace(host)  # the root-namespace end; links and namespaces have separate names

    def _create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ns, veth = self.namespace(host), self._veth(host)
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            ip("link", "set", f"{veth}p", "netns", ns)
            ip("-n", ns, "link", "set", f"{veth}p", "name", "eth0")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv inside the host's namespace (`ip netns exec` execs it: the pid is argv's)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def cut(self, host: str) -> None:
        """Take the host's link down: its packets are dropped both ways, connections stay open."""
        ip("link", "set", self._veth(host), "down")

    def heal(self, host: str) -> None:
        ip("link", "set", self._veth(host), "up")

    def shape(self, host: str, rate: str = "16mbit") -> None:
        """Limit the host's link to `rate` each way (token bucket), so transfers take a while."""
        self._qdisc(host, "replace", "tbf", "rate", rate, "burst", "32kb", "latency", "1s")

    def netem(self, host: str, spec: str) -> None:
        """Delay or lose the host's packets each way, e.g. "delay 200ms loss 30%". Raises
        NetnsUnavailable where the kernel has no netem (CONFIG_NET_SCH_NETEM is off on some)."""
        try:
            self._qdisc(host, "replace", "netem", *spec.split())
        except subprocess.CalledProcessError as exc:
            raise NetnsUnavailable(f"tc netem {spec}: {exc.stderr.strip()}") from exc

    def unshape(self, host: str) -> None:
        """Remove shape() or netem() from the host's link."""
        self._qdisc(host, "del", check=False)

    def _qdisc(self, host: str, verb: str, *qdisc: str, check: bool = True) -> None:
        """One root qdisc at both ends of the host's link: the bridge's veth and the host's eth0."""
        for netns, dev in (([], self._veth(host)), (["-n", self.namespace(host)], "eth0")):
            subprocess.run(["tc", *netns, "qdisc", verb, "dev", dev, "root", *qdisc], check=check,
                           capture_output=True, text=True)

    def queued_bytes(self, host: str) -> int:
        """Bytes written to the host's TCP sockets and not yet acknowledged (tx_queue of
        /proc/net/tcp as seen from inside its namespace): how much it is sending right now."""
        pids = ip("netns", "pids", self.namespace(host), check=False).stdout.split()
        for pid in pids:
            try:
                table = Path(f"/proc/{pid}/net/tcp").read_text()
            except OSError:
                continue
            rows = [line.split() for line in table.splitlines()[1:]]
            return sum(int(row[4].split(":")[0], 16) for row in rows if len(row) > 4)
        return 0

    def close(self) -> None:
        """Kill every process in the namespaces, then delete them, their links and the bridge."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for host in self.hosts:
            _kill_pids(self.namespace(host))
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for host in self.hosts:
            ip("netns", "del", self.namespace(host), check=False)
            ip("link", "del", self._veth(host), check=False)
        ip("link", "del", self.bridge, check=False)
        self._wait_gone()

    def _wait_gone(self, timeout_s: float = 10.0) -> None:
        """Namespace teardown finishes in the kernel after `ip netns del` returns."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and f"{self.owner}-" in ip("-o", "link", "show").stdout:
            time.sleep(0.1)
