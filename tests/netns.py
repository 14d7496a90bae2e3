"""Hosts in network namespaces on this machine, for the partition drills (tests/e2e/test_partitions.py).

A `Lab` is a few namespaces the test creates and removes: one `lab` namespace holds the switch (a Linux bridge per
network) and the test's own addresses on it, so the test itself is one more host on those networks; every other
host (Redis, API, workers) is a namespace with a veth "cable" into the lab's bridge. The test talks to the hosts from
inside the lab namespace (`Lab.inside`: this thread's sockets are created there), never from the machine's own
network: every address the drills use exists only inside namespaces the test created, and goes with them.

Faults, both keeping every process alive:
- `cut`/`heal`: the switch side of a host's cable goes down (the host sees its carrier go; packets are dropped,
  no reset or unreachable reaches anyone: a pulled cable).
- `blackhole`/`unblackhole`: iptables DROP inside the host's namespace towards one address (a firewall or a
  routing hole that silently eats packets), the host's other links untouched.
"""

import ctypes
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.procs import Proc

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def unavailable() -> str | None:
    """Why the drills cannot run here (a skip reason), or None: root, `ip netns`, veth and bridges."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, bridges)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"sdxlp-probe-{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
        try:
            _run("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        return f"`ip netns` with veth and bridges is not available here: {detail}"
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Lab:
    """Namespaces `<prefix>-<host>`; networks are /24s named by their third octet (10.213.<n>.0/24)."""

    def __init__(self) -> None:
        # unique per run: two runs side by side (or a leftover of a crashed one) never share a namespace
        self.prefix = f"sdxlp{uuid.uuid4().hex[:6]}"
        self.namespaces: list[str] = []
        self.procs: list[Proc] = []
        self.addrs: dict[tuple[str, int], str] = {}  # (host, net) -> its address
        self.lab = self._add_ns("lab")
        _run("ip", "-n", self.lab, "link", "set", "lo", "up")

    def _add_ns(self, host: str) -> str:
        name = f"{self.prefix}-{host}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        return name

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def network(self, net: int) -> str:
        """A switch for 10.213.<net>.0/24; the lab (the test) is .1 on it."""
        br = f"br{net}"
        _run("ip", "-n", self.lab, "link", "add", br, "type", "bridge")
        _run("ip", "-n", self.lab, "addr", "add", f"10.213.{net}.1/24", "dev", br)
        _run("ip", "-n", self.lab, "link", "set", br, "up")
        return f"10.213.{net}.1"

    def host(self, host: str, links: dict[int, int]) -> dict[int, str]:
        """A host namespace with one cable per network: {net: last octet} -> {net: address}."""
        ns = self._add_ns(host)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        for i, (net, octet) in enumerate(links.items()):
            port = self.port(host, net)
            # both ends are created straight inside their namespaces: no name is ever taken in the machine's own
            _run("ip", "link", "add", port, "netns", self.lab, "type", "veth", "peer", "name", f"eth{i}", "netns", ns)
            _run("ip", "-n", self.lab, "link", "set", port, "master", f"br{net}")
            _run("ip", "-n", self.lab, "link", "set", port, "up")
            addr = f"10.213.{net}.{octet}"
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", f"eth{i}")
            _run("ip", "-n", ns, "link", "set", f"eth{i}", "up")
            self.addrs[(host, net)] = addr
        return {net: self.addrs[(host, net)] for net in links}

    @staticmethod
    def port(host: str, net: int) -> str:
        return f"{host[:10]}-{net}"  # the switch side of the host's cable (15 characters at most)

    # --- faults ----------------------------------------------------------------------------------
    def cut(self, host: str, net: int) -> None:
        _run("ip", "-n", self.lab, "link", "set", self.port(host, net), "down")

    def heal(self, host: str, net: int) -> None:
        _run("ip", "-n", self.lab, "link", "set", self.port(host, net), "up")

    def blackhole(self, host: str, addr: str) -> None:
        for rule in (["OUTPUT", "-d", addr], ["INPUT", "-s", addr]):
            _run("ip", "netns", "exec", self.ns(host), "iptables", "-w", "-A", *rule, "-j", "DROP")

    def unblackhole(self, host: str, addr: str) -> None:
        for rule in (["OUTPUT", "-d", addr], ["INPUT", "-s", addr]):
            _run("ip", "netns", "exec", self.ns(host), "iptables", "-w", "-D", *rule, "-j", "DROP")

    # --- processes -------------------------------------------------------------------------------
    def start(self, host: str, args: list[str], env: dict[str, str], log: Path) -> Proc:
        """A process on `host` (`ip netns exec` execs it: signals reach it directly)."""
        p = Proc(["ip", "netns", "exec", self.ns(host), *args], env, log)
        self.procs.append(p)
        return p

    @contextmanager
    def inside(self) -> Iterator[None]:
        """This thread in the lab namespace: the sockets it opens meanwhile are the test host's."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / self.lab, os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)

    def close(self) -> None:
        """Stop every process, then remove every namespace (with its cables, bridges and rules). Deleting a
        namespace does not end what runs in it: anything still there (a process one of ours forked) is killed."""
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.stop(timeout=15)
        for ns in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                if int(pid) == os.getpid():
                    continue  # never this test process (a thread of it may have been left inside by a failure)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while pids.strip() and time.monotonic() < deadline:
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
                time.sleep(0.1)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()
