"""`vmetal doctor --cluster HOSTFILE --model M` (issue 16): every node of a multi-node serve checked from one,
over ssh's calling convention, on two network namespaces joined by a veth pair (`tests/support/netns.py`; ssh
itself is stood in for by `tests/support/netns_ssh.py`, since no ssh server runs here): real `vmetal doctor
--node-facts` processes on each "host", reached on the pair's addresses.

What a user would notice: exit 0 and a ✓ per node when the nodes match (same versions, same model files, the
port reachable at the hostfile's address); exit 1 with the node, what differs and what to do when a node holds
other model files at the same path, when an address in the hostfile does not reach the node, and when a node
does not answer at all; a hostfile that is not mlx.launch's format refused in one line.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import Host, two_hosts

pytestmark = pytest.mark.slow

STAND_IN = shlex.join([sys.executable, str(Path(__file__).parents[1] / "support" / "netns_ssh.py")])


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as pair:
        yield pair


def doctor(head: Host, hostfile: Path, model: Path, env: dict[str, str] | None = None) -> tuple[int, dict]:
    out = subprocess.run(["ip", "netns", "exec", head.netns, sys.executable, "-m", "vmetal.cli.app", "doctor",
                          "--json", "--cluster", str(hostfile), "--model", str(model), "--ssh", STAND_IN],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return out.returncode, json.loads(out.stdout)


def nodes(report: dict) -> dict[str, dict]:
    return {c["details"].get("node", c["title"]): c for c in report["checks"] if c["id"] == "cluster_node"}


def test_matching_nodes_pass(hosts, qwen3_model, tmp_path):
    a, b = hosts
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": a.netns, "ips": [a.address]}, {"ssh": b.netns, "ips": [b.address]}]))
    code, report = doctor(a, hostfile, qwen3_model)
    got = nodes(report)
    assert [got[h.netns]["status"] for h in (a, b)] == ["ok", "ok"], got
    assert "same versions, same model; port" in got[b.netns]["summary"] and "reachable" in got[b.netns]["summary"]
    assert abs(got[b.netns]["details"]["clock_offset_s"]) < 0.05  # one clock: only the pipe's latency
    assert code == 0, [c for c in report["checks"] if c["status"] == "fail"]


def test_other_files_a_wrong_address_and_a_silent_node_fail_naming_each(hosts, qwen3_model, tmp_path):
    a, b = hosts
    other = tmp_path / "other-copy"
    shutil.copytree(qwen3_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    wrong = a.address.rsplit(".", 1)[0] + ".77"  # on the pair's subnet, but no host there
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": b.netns, "ips": [b.address, wrong]},
                                    {"ssh": "vmt-no-such-host", "ips": ["10.231.0.99"]}]))
    code, report = doctor(a, hostfile, qwen3_model, {f"NETNS_SSH_BIND_{b.netns}": f"{other}:{qwen3_model}"})
    assert code == 1
    got = nodes(report)
    assert got[b.netns]["status"] == "fail"
    assert f"`{qwen3_model}` differs from this node's copy" in got[b.netns]["summary"]
    assert f"not reachable at {wrong}" in got[b.netns]["summary"]
    assert "copy the same files to every node" in got[b.netns]["fix"]
    assert got["vmt-no-such-host"]["status"] == "fail"
    assert got["vmt-no-such-host"]["summary"].startswith("no answer over")


def test_a_hostfile_not_in_mlx_launch_format_is_refused(hosts, qwen3_model, tmp_path):
    a, _ = hosts
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"hosts": ["mac1", "mac2"]}))
    code, report = doctor(a, hostfile, qwen3_model)
    assert code == 1
    [check] = nodes(report).values()
    assert check["summary"].startswith(f"--cluster {hostfile}: expected a JSON list of nodes")
