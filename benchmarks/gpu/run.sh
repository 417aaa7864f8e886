#!/usr/bin/env bash
# On the lent GPU machine, in the checkout the `run` tool copies (see stage.py for the whole recipe):
#   run.sh keep            move the carried .gpu-bundle/part-* files to /tmp/vmetal-parts (one part per call)
#   run.sh unpack          check every part against SHA256SUMS, unpack the site into /tmp/vmetal-site
#   run.sh COMMAND ARGS    run COMMAND with the staged site and this checkout on PYTHONPATH
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
parts=/tmp/vmetal-parts
site=/tmp/vmetal-site

case "${1:-}" in
keep)
    mkdir -p "$parts"
    shopt -s nullglob
    for f in "$root"/.gpu-bundle/part-* "$root"/.gpu-bundle/SHA256SUMS; do
        [ -e "$f" ] && cp "$f" "$parts/"  # the sums travel with one part only
    done
    ls -l "$parts"
    ;;
unpack)
    (cd "$parts" && sha256sum -c SHA256SUMS)
    rm -rf "$site" && mkdir -p "$(dirname "$site")"
    cat "$parts"/part-* | tar -C /tmp -xJf - && mv /tmp/site "$site"
    # libmlx.so finds the CUDA libraries at $ORIGIN/../../nvidia: those of the machine's own torch.
    torch_dir=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
    ln -sfn "$(dirname "$torch_dir")/nvidia" "$site/nvidia"
    PYTHONPATH="$site:$root" python3 -c 'import mlx.core as mx, vllm; print("staged:", mx.default_device(), "vllm", vllm.__version__)'
    ;;
"")
    echo "usage: run.sh keep | unpack | COMMAND [ARGS...]" >&2
    exit 2
    ;;
*)
    PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}" VMETAL_ENABLE=1 exec "$@"
    ;;
esac
