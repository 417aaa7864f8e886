"""ssh's calling convention (`HOST COMMAND`: one shell command run on HOST) for the tests' network namespaces,
which have no ssh server: HOST names the namespace. `NETNS_SSH_BIND_<HOST>=SRC:DST` first bind-mounts SRC over
DST in a mount namespace of that call's own, so one "host" sees other files at the same path, as another Mac's
disk would hold them."""

from __future__ import annotations

import os
import shlex
import sys

host, command = sys.argv[1], sys.argv[2]
bind = os.environ.get(f"NETNS_SSH_BIND_{host}")
if bind:
    src, dst = bind.split(":")
    argv = ["ip", "netns", "exec", host, "unshare", "-m", "sh", "-c",
            f"mount --bind {shlex.quote(src)} {shlex.quote(dst)} && {command}"]
else:
    argv = ["ip", "netns", "exec", host, "sh", "-c", command]
os.execvp(argv[0], argv)
