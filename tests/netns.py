"""A network namespace joined to the host by a veth pair, whose link can be cut.

A client run inside it (`Namespace.popen`) reaches the host at `host_addr`. `cut()` takes the
namespace's end of the pair down: from then on nothing that either side sends arrives, and neither
kernel sends a FIN, a reset or an ACK for the other. To the host that is a client vanished behind a
load balancer, which SIGSTOP cannot imitate (a stopped process's kernel still acknowledges).

Needs root and `ip` from iproute2; `namespace()` skips the test with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import subprocess
from typing import Iterator

import pytest

# 198.18.0.0/15 is for benchmarking networks (RFC 2544): unlikely to clash with a real route.
_BLOCK = ipaddress.ip_network("198.18.0.0/15")
_SUBNETS = _BLOCK.num_addresses // 4
_counter = itertools.count()


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def _ip(*args: str) -> None:
    _run("ip", *args)


class Namespace:
    """One namespace `name` with the veth pair `host_if` (host, `host_addr`) and `peer_if`
    (inside, `peer_addr`) on a /30 of its own: the names and the subnet come from the test
    process's pid, so concurrent test runs do not meet."""

    def __init__(self) -> None:
        n = next(_counter)
        tag = f"{os.getpid()}{'abcdefgh'[n % 8]}"
        self.name = f"gpz{tag}"
        self.host_if = f"gpz{tag}h"
        self.peer_if = f"gpz{tag}n"
        subnet = (os.getpid() * 8 + n % 8) % _SUBNETS
        base = _BLOCK.network_address + 4 * subnet
        self.host_addr = str(base + 1)
        self.peer_addr = str(base + 2)

    def create(self) -> None:
        self.remove()  # left by a killed run whose pid was the same as ours
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if,
            "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.peer_addr}/30", "dev", self.peer_if)
        _ip("-n", self.name, "link", "set", self.peer_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Run argv inside the namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def unacked(self) -> int:
        """Bytes the host's connections to the namespace sent or queued and saw no ACK for yet.

        Cut while this is not 0 (a reply whose ACK the client delayed, say) and the host's
        retransmissions, not its idle-connection probes, find the silence."""
        out = _run("ss", "-Htn", "state", "established", "dst", self.peer_addr)
        return sum(int(line.split()[1]) for line in out.splitlines())

    def cut(self) -> None:
        """Cut the link without a word to either side."""
        _ip("-n", self.name, "link", "set", self.peer_if, "down")

    def remove(self) -> None:
        """Delete the pair (both ends at once) and the namespace; whatever is left is gone."""
        for args in (("link", "del", self.host_if), ("netns", "del", self.name)):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip(*args)


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """A fresh Namespace, removed on the way out even when the test fails."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("`ip` from iproute2 is not installed")
    ns = Namespace()
    try:
        try:
            ns.create()
        except RuntimeError as exc:
            pytest.skip(f"cannot make a network namespace here: {exc}")
        yield ns
    finally:
        ns.remove()
