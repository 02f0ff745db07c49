"""Separate network hosts on one machine: Linux network namespaces on a private switch.

Each host is a namespace with its own loopback and one address on a /24; their veth
links meet on a bridge inside a switch namespace this helper also makes, so every packet
stays between namespaces the test made (none reaches the machine's own network). A
process runs on a host through `ip netns exec`. Everything is removed when the block
ends, however it ends: the processes left in each namespace are killed, then the
namespaces (their links go with them).

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN). ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

SUBNET = "10.231.{net}.{host}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def unavailable() -> str | None:
    """Why this machine cannot make namespaces here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"pl-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        return f"`ip netns add` is not permitted here: {detail.strip()}"
    with suppress(subprocess.CalledProcessError):
        _ip("netns", "del", name)
    return None


@dataclass
class Network:
    tag: str  # unique per network: namespace and link names
    net: int  # the third octet of 10.231.<net>.0/24
    hosts: dict[str, str] = field(default_factory=dict)  # name -> address

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return self.hosts[host]

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def run(self, host: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(host, argv), **kwargs)

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, argv), **kwargs)


@contextmanager
def network(*names: str) -> Iterator[Network]:
    """Hosts ``names`` (10.231.<net>.1, .2, ... in order) on one private switch."""
    tag = f"pl{os.getpid() % 100000}"
    net = os.getpid() % 200 + 20
    switch = f"{tag}-sw"
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        hosts = {}
        for index, name in enumerate(names, start=1):
            space = f"{tag}-{name}"
            _ip("netns", "add", space)
            made.append(space)
            _ip("-n", space, "link", "set", "lo", "up")
            # One veth pair: "eth0" on the host, its peer on the switch's bridge.
            peer = ("peer", "name", f"p{index}", "netns", switch)
            _ip("-n", space, "link", "add", "eth0", "type", "veth", *peer)
            _ip("-n", switch, "link", "set", f"p{index}", "master", "br0", "up")
            address = SUBNET.format(net=net, host=index)
            _ip("-n", space, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", space, "link", "set", "eth0", "up")
            hosts[name] = address
        yield Network(tag, net, hosts)
    finally:
        for space in reversed(made):
            _kill_all(space)
            with suppress(subprocess.CalledProcessError):
                _ip("netns", "del", space)


def _kill_all(space: str) -> None:
    """SIGTERM what still runs in ``space``, SIGKILL what outlives 10 s."""

    def pids() -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", space], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)
