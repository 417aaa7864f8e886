"""Two "hosts" for the multi-node tests: two network namespaces joined by a veth pair, made for a test module and
removed after it; where they cannot be made (not root, no iproute2 `ip`) the module is skipped with the reason."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Host:
    netns: str
    address: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("two network namespaces need root and iproute2's `ip`")
    tag = f"vmt{os.getpid() % 100000}"
    subnet = f"10.231.{random.randrange(1, 250)}"
    a, b = Host(f"{tag}a", f"{subnet}.1"), Host(f"{tag}b", f"{subnet}.2")
    made: list[str] = []
    try:
        for host in (a, b):
            r = _ip("netns", "add", host.netns)
            if r.returncode:
                pytest.skip(f"cannot make a network namespace here: {r.stderr.strip()}")
            made.append(host.netns)
        steps = [("link", "add", f"{tag}-a", "type", "veth", "peer", "name", f"{tag}-b"),
                 ("link", "set", f"{tag}-a", "netns", a.netns), ("link", "set", f"{tag}-b", "netns", b.netns)]
        for host, dev in ((a, f"{tag}-a"), (b, f"{tag}-b")):
            steps += [("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", dev),
                      ("-n", host.netns, "link", "set", dev, "up"), ("-n", host.netns, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, (step, r.stderr)
        yield a, b
    finally:
        for name in made:  # the veth pair goes with its namespaces
            _ip("netns", "del", name)


