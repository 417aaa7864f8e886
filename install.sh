#!/usr/bin/env bash
# install.sh - build (or bring up to date) a virtual environment with vLLM, MLX and vmetal.
#
# The pins (vLLM, mlx, mlx-lm, the macOS wheel URL, what to remove) live in
# vmetal/install/plan.py; this script asks it for them (`plan.py --shell`).
# Written for bash 3.2 (macOS's /bin/bash) as well as bash 5.
#
# How a failed run leaves things (the rollback design)
# ----------------------------------------------------
# A venv is not relocatable: its scripts' shebangs and bin/activate hold its path, so a
# venv built at a temporary path cannot be renamed into place afterwards. Snapshotting
# `pip freeze` and reinstalling it after a failed upgrade needs the network, cannot
# express editable or by-URL installs faithfully, and leaves stray packages behind.
# So every venv is only ever built at its final path, and an old one is kept whole:
#
#   * no venv at PATH   -> "fresh": create it there; if any step fails, delete it.
#   * a venv at PATH that already has the pinned vLLM/mlx/mlx-lm, Python and imports
#                       -> "update": reinstall vmetal from this checkout in place (pip is
#                          a no-op for what is satisfied; a failed pip install of vmetal
#                          rolls itself back), remove the conflicting packages, re-check.
#                          This is the re-run path: seconds, no rebuild.
#   * a venv at PATH marked by this script (.vmetal-venv) that does not match
#                       -> "rebuild": rename it to PATH.old (a rename: atomic, nothing
#                          inside changes), build a new one at PATH; on success delete
#                          PATH.old, on any failure delete the new one and rename PATH.old
#                          back. The old venv is byte-for-byte what it was.
#   * a venv at PATH without the marker that does not match -> refuse: not ours to replace.
#
# A run killed with SIGKILL cannot clean up, so a new build carries
# PATH/.vmetal-install-in-progress until it is complete; the next run sees it (and any
# PATH.old) and restores the previous state before doing anything else. A lock directory
# (PATH.install-lock) keeps two runs off the same venv.
set -euo pipefail

usage() {
  cat <<EOF
Usage: ./install.sh [options]

Create a Python virtual environment with vLLM, MLX and vmetal (from this checkout),
or bring an existing one up to date. Safe to re-run: a venv that is already right
only gets vmetal reinstalled. A failed run leaves the previous venv as it was.

Options:
  --venv PATH           where the venv goes (default: \${VMETAL_VENV:-\$HOME/.venv-vllm-metal})
  --python PATH         interpreter for a new venv (default: macOS: python3.12;
                        Linux: python3 if >= 3.11, else the newest python3.1x found)
  --vllm-version V      vLLM release (default: the tested pin, see vmetal/install/plan.py)
  --mlx-extra EXTRA     Linux only: cpu (default) or cuda13 (mlx[cuda13] on an NVIDIA host)
  --torch-index URL     Linux only: where the +cpu torch build comes from (default: PyTorch's
                        CPU index when reachable; "none" to rely on pip's own configuration)
  --dev                 editable install of this checkout, with the [test] extras
  --dry-run             print each step and change nothing
  -h, --help            show this help

Platforms: macOS on Apple silicon (native arm64 Python 3.12, not Rosetta), Linux x86_64/aarch64.
Exit status: 0 done, 1 failed (the previous venv is untouched), 2 bad usage.
EOF
}

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'error: %s; see ./install.sh --help\n' "$*" >&2; exit 2; }
say() { printf '%s\n' "$*"; }

# Shell-quote a command for display, so a printed step can be pasted back.
quote_args() {
  local out="" a
  for a in "$@"; do
    case $a in
      "" | *[!A-Za-z0-9_./=:@%+,-]*) a="'$(printf '%s' "$a" | sed "s/'/'\\\\''/g")'" ;;
    esac
    out="$out${out:+ }$a"
  done
  printf '%s' "$out"
}

# --- Options ---------------------------------------------------------------------------
VENV="${VMETAL_VENV:-$HOME/.venv-vllm-metal}"
PYTHON_ARG=""
VLLM_VERSION_ARG=""
MLX_EXTRA_ARG=""
TORCH_INDEX_ARG="auto"
DEV=0
DRY_RUN=0

need_value() { # option, remaining-arg-count, next-arg
  if [ "$2" -lt 2 ]; then usage_error "$1 needs a value"; fi
  case $3 in -*) usage_error "$1 needs a value (got option $3)" ;; esac
}

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dev) DEV=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --venv) need_value "$1" $# "${2-}"; VENV=$2; shift 2 ;;
    --venv=*) VENV=${1#*=}; shift ;;
    --python) need_value "$1" $# "${2-}"; PYTHON_ARG=$2; shift 2 ;;
    --python=*) PYTHON_ARG=${1#*=}; shift ;;
    --vllm-version) need_value "$1" $# "${2-}"; VLLM_VERSION_ARG=$2; shift 2 ;;
    --vllm-version=*) VLLM_VERSION_ARG=${1#*=}; shift ;;
    --mlx-extra) need_value "$1" $# "${2-}"; MLX_EXTRA_ARG=$2; shift 2 ;;
    --mlx-extra=*) MLX_EXTRA_ARG=${1#*=}; shift ;;
    --torch-index) need_value "$1" $# "${2-}"; TORCH_INDEX_ARG=$2; shift 2 ;;
    --torch-index=*) TORCH_INDEX_ARG=${1#*=}; shift ;;
    -*) usage_error "unknown option $1" ;;
    *) usage_error "unexpected argument $1" ;;
  esac
done

case $MLX_EXTRA_ARG in
  "" | cpu | cuda13) ;;
  *) usage_error "--mlx-extra must be cpu or cuda13, not $MLX_EXTRA_ARG" ;;
esac
if [ -n "$VLLM_VERSION_ARG" ] && ! [[ $VLLM_VERSION_ARG =~ ^[0-9]+(\.[0-9]+)*([a-z.]+[0-9]+)*$ ]]; then
  usage_error "--vllm-version must be a release number like 0.32.0, not $VLLM_VERSION_ARG"
fi
[ -n "$VENV" ] || usage_error "--venv needs a path"
case $VENV in /*) ;; *) VENV="$PWD/$VENV" ;; esac
while [ "$VENV" != "/" ] && [ "${VENV%/}" != "$VENV" ]; do VENV=${VENV%/}; done
[ "$VENV" != "/" ] || usage_error "--venv cannot be /"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PLAN_PY="$REPO/vmetal/install/plan.py"
if [ ! -f "$REPO/pyproject.toml" ] || [ ! -f "$PLAN_PY" ]; then
  die "$REPO is not a vmetal checkout (no pyproject.toml or vmetal/install/plan.py); run install.sh from a clone of the repository"
fi

export PIP_NO_INPUT=1 PIP_USER=0
[ -t 1 ] || export PIP_PROGRESS_BAR=off

STARTED=$SECONDS
STEP_NO=0
step() { STEP_NO=$((STEP_NO + 1)); STEP_STARTED=$SECONDS; say "==> [$STEP_NO] $*"; }
done_step() { [ "$DRY_RUN" = 1 ] || say "    ($((SECONDS - STEP_STARTED)) s)"; }

# run HINT CMD...: print the command; run it unless --dry-run; on failure, stop with HINT.
run() {
  local hint=$1 rc=0
  shift
  say "    + $(quote_args "$@")"
  [ "$DRY_RUN" = 0 ] || return 0
  "$@" || rc=$?
  [ "$rc" = 0 ] || die "\`$(quote_args "$@")\` failed (exit $rc); $hint"
}

# --- Host ------------------------------------------------------------------------------
OS=$(uname -s)
if [ "$OS" = Darwin ]; then
  if [ "$(sysctl -n sysctl.proc_translated 2>/dev/null || echo 0)" = 1 ]; then
    die "this shell runs under Rosetta (x86_64 emulation); open a native arm64 terminal, or run: arch -arm64 /bin/bash install.sh"
  fi
  if [ "$(sysctl -n hw.optional.arm64 2>/dev/null || echo 0)" != 1 ] || [ "$(uname -m)" != arm64 ]; then
    die "vmetal needs an Apple silicon Mac (M1 or later); this is an Intel Mac ($(uname -m))"
  fi
fi

# --- Python ----------------------------------------------------------------------------
plan_args=()
[ -z "$VLLM_VERSION_ARG" ] || plan_args+=(--vllm-version "$VLLM_VERSION_ARG")
[ -z "$MLX_EXTRA_ARG" ] || plan_args+=(--mlx-extra "$MLX_EXTRA_ARG")
# plan PYTHON MODE...: run vmetal/install/plan.py with that interpreter, outside the checkout.
plan() {
  local py=$1
  shift
  (cd / && "$py" "$PLAN_PY" "$@" ${plan_args[@]+"${plan_args[@]}"})
}

PYTHON=""
if [ -n "$PYTHON_ARG" ]; then
  if ! PYTHON=$(command -v "$PYTHON_ARG" 2>/dev/null) || ! "$PYTHON" -c '' 2>/dev/null; then
    die "--python $PYTHON_ARG: no such interpreter; pass the path of a Python 3.12 (macOS) or >= 3.11 (Linux)"
  fi
  PLAN_OUT=$(plan "$PYTHON" --shell) || exit 1 # install_plan.py printed the reason
else
  BOOT=""
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c '' >/dev/null 2>&1; then BOOT=$c; break; fi
  done
  if [ "$OS" = Darwin ]; then
    wanted="Python 3.12" hint="brew install python@3.12"
  else
    wanted="Python >= 3.11" hint="e.g. apt-get install python3.12 python3.12-venv"
  fi
  [ -n "$BOOT" ] || die "$wanted not found; install it ($hint) or pass --python PATH"
  first_error=""
  for c in $(plan "$BOOT" --python-candidates); do
    path=$(command -v "$c" 2>/dev/null) || continue
    "$path" -c '' >/dev/null 2>&1 || continue # e.g. a pyenv shim for a version not selected
    if err=$(plan "$path" --shell 2>&1 >/dev/null); then
      PYTHON=$("$path" -c 'import sys; print(sys.executable)') # past shims such as pyenv's
      break
    fi
    [ -n "$first_error" ] || first_error="$path: ${err#error: }"
  done
  if [ -z "$PYTHON" ]; then
    [ -z "$first_error" ] || die "no usable Python: $first_error"
    die "$wanted not found; install it ($hint) or pass --python PATH"
  fi
  PLAN_OUT=$(plan "$PYTHON" --shell) || exit 1
fi

P_PYTHON_VERSION="" P_VLLM_VERSION="" P_VLLM_DIST="" P_MLX_EXTRA="" P_STACK="" P_TORCH_INDEX=""
P_REMOVE="" P_MARKER="" P_IN_PROGRESS="" P_PLATFORM=""
while IFS= read -r line; do
  value=${line#*=}
  case ${line%%=*} in
    PLATFORM) P_PLATFORM=$value ;;
    PYTHON_VERSION) P_PYTHON_VERSION=$value ;;
    VLLM_VERSION) P_VLLM_VERSION=$value ;;
    VLLM_DIST) P_VLLM_DIST=$value ;;
    MLX_EXTRA) P_MLX_EXTRA=$value ;;
    STACK_REQUIREMENTS) P_STACK=$value ;;
    TORCH_INDEX_URL) P_TORCH_INDEX=$value ;;
    REMOVE_PACKAGES) P_REMOVE=$value ;;
    MARKER_NAME) P_MARKER=$value ;;
    IN_PROGRESS_NAME) P_IN_PROGRESS=$value ;;
  esac
done <<EOF
$PLAN_OUT
EOF
if [ -z "$P_STACK" ] || [ -z "$P_MARKER" ] || [ -z "$P_IN_PROGRESS" ]; then
  die "vmetal/install/plan.py --shell gave no pins; is this checkout complete? (git status)"
fi
read -r -a STACK_REQS <<<"$P_STACK"
PY_MINOR=$(printf '%s' "$P_PYTHON_VERSION" | cut -d. -f1-2)

VPY="$VENV/bin/python"
MARKER="$VENV/$P_MARKER"
IN_PROGRESS="$VENV/$P_IN_PROGRESS"
OLD="$VENV.old"
LOCK="$VENV.install-lock"

say "vmetal install: $P_PLATFORM, Python $P_PYTHON_VERSION ($PYTHON)"
say "  venv:   $VENV"
say "  pins:   $P_STACK"
say "  vmetal: $REPO$([ "$DEV" = 1 ] && printf ' (editable, with test extras)')"
[ "$DRY_RUN" = 0 ] || say "  dry run: nothing will be changed"

# --- Lock, and recovery from a run that was killed --------------------------------------
ROLLBACK="" # what to undo if we stop early: fresh | rebuild
HAVE_LOCK=0

rollback() {
  case $ROLLBACK in
    fresh)
      rm -rf "$VENV"
      say "rolled back: removed the partial venv at $VENV" >&2
      ;;
    rebuild)
      rm -rf "$VENV"
      mv "$OLD" "$VENV"
      say "rolled back: $VENV is the previous venv again, unchanged" >&2
      ;;
  esac
  ROLLBACK=""
}

on_exit() {
  local rc=$?
  trap - EXIT
  # A Ctrl-C during the rollback (a second one, or the first one arriving just as a failed step rolls back)
  # would cut it short between `rm -rf` and `mv`: the new venv half deleted at PATH, the old one at PATH.old.
  # Ignored from here on, by rm and mv too (they inherit it); only SIGKILL can stop this, and the next
  # run's recovery undoes that.
  trap '' INT TERM HUP
  if [ "$rc" != 0 ] && [ -n "$ROLLBACK" ]; then rollback || true; fi
  if [ "$HAVE_LOCK" = 1 ]; then rm -rf "$LOCK"; fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV"); pick a writable --venv PATH"
  if ! mkdir "$LOCK" 2>/dev/null; then
    other=$(cat "$LOCK/pid" 2>/dev/null || true)
    if [ -n "$other" ] && kill -0 "$other" 2>/dev/null; then
      die "another install.sh (pid $other) is working on $VENV; wait for it to finish, or remove $LOCK if it is gone"
    fi
    rm -rf "$LOCK"
    mkdir "$LOCK" 2>/dev/null || die "cannot take the lock $LOCK; remove it if no install.sh is running"
  fi
  HAVE_LOCK=1
  echo $$ >"$LOCK/pid"
fi

# Undo what a killed run left (see the comment at the top).
recover() {
  if [ -e "$IN_PROGRESS" ] || [ -d "$OLD" ]; then RECOVERED=1; fi
  if [ -e "$IN_PROGRESS" ]; then
    if [ -d "$OLD" ]; then
      say "note: a previous install.sh run was interrupted; restoring the venv it had set aside"
      run "remove $VENV and rename $OLD to $VENV by hand" rm -rf "$VENV"
      run "rename $OLD to $VENV by hand" mv "$OLD" "$VENV"
    else
      say "note: a previous install.sh run was interrupted; removing the partial venv it left"
      run "remove $VENV by hand" rm -rf "$VENV"
    fi
  elif [ -d "$OLD" ]; then
    if [ ! -e "$VENV" ]; then
      say "note: a previous install.sh run was interrupted; restoring $OLD"
      run "rename $OLD to $VENV by hand" mv "$OLD" "$VENV"
    elif [ -f "$OLD/$P_MARKER" ]; then
      say "note: removing $OLD, left by a previous run after its new venv was complete"
      run "remove $OLD by hand" rm -rf "$OLD"
    else
      die "$OLD exists and was not left by install.sh; move it away (install.sh keeps the previous venv there while it rebuilds)"
    fi
  fi
}
RECOVERED=0
recover
if [ "$DRY_RUN" = 1 ] && [ "$RECOVERED" = 1 ]; then
  say "dry run: stopping here; a real run first undoes the interrupted one as shown, then installs"
  exit 0
fi

# --- What to do with PATH: fresh, update or rebuild -------------------------------------
# inspect: print why the venv at $VENV cannot be reused as it is (nothing = reusable).
inspect() {
  local expect=()
  [ -x "$VPY" ] || { say "no $VPY"; return 0; }
  [ -z "$PYTHON_ARG" ] || expect=(--expect-python "$PY_MINOR")
  (cd / && "$VPY" "$PLAN_PY" --check ${expect[@]+"${expect[@]}"} ${plan_args[@]+"${plan_args[@]}"} 2>&1) && {
    (cd / && "$VPY" -c "import vllm, mlx.core, mlx_lm" >/dev/null 2>&1) || say "import vllm, mlx.core, mlx_lm fails in it"
  }
  return 0
}

if [ ! -e "$VENV" ] && [ ! -L "$VENV" ]; then
  MODE=fresh
elif [ ! -f "$VENV/pyvenv.cfg" ]; then
  die "$VENV exists and is not a virtual environment; move it away or pass another --venv PATH"
else
  say "==> checking the existing venv"
  problems=$(inspect)
  if [ -z "$problems" ]; then
    MODE=update
    say "    it has the pinned versions: updating vmetal in place"
  elif [ -f "$MARKER" ]; then
    MODE=rebuild
    say "    it needs a rebuild: $(printf '%s' "$problems" | tr '\n' ';' | sed 's/;/; /g')"
    say "    building a new one there; the current one waits at $OLD until the new one works"
  else
    die "$VENV was not created by install.sh (no $P_MARKER) and does not match the pins ($(printf '%s' "$problems" | head -n 1)); move it away or pass another --venv PATH"
  fi
fi

# --- Steps -----------------------------------------------------------------------------
pip() { run "$1" "$VPY" -m pip "${@:2}"; }

# run_in_root HINT CMD...: like run, from / so that this checkout cannot shadow the
# installed vmetal (a folder named like a package on sys.path wins over the install).
run_in_root() {
  local hint=$1 rc=0
  shift
  say "    + (cd / && $(quote_args "$@"))"
  [ "$DRY_RUN" = 0 ] || return 0
  (cd / && "$@") || rc=$?
  [ "$rc" = 0 ] || die "\`$(quote_args "$@")\` failed (exit $rc); $hint"
}

if [ "$MODE" != update ]; then
  if [ "$MODE" = rebuild ]; then
    step "setting the current venv aside"
    run "check permissions on $(dirname "$VENV")" mv "$VENV" "$OLD"
    ROLLBACK=rebuild
  else
    ROLLBACK=fresh
  fi
  step "creating a venv at $VENV with Python $P_PYTHON_VERSION"
  # Marked unfinished before anything of it exists: a run killed inside `python -m venv` must leave a
  # folder that the next run and `vmetal uninstall` know for a partial build, never one that passes for
  # the finished venv (the next run would then delete the previous venv kept at $OLD).
  if [ "$DRY_RUN" = 0 ]; then
    mkdir -p "$VENV" || die "cannot create $VENV; pick a writable --venv PATH"
    printf 'pid %s, %s\n' "$$" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$IN_PROGRESS"
  fi
  run "on Debian/Ubuntu install python${PY_MINOR}-venv, or pass --python PATH" "$PYTHON" -m venv "$VENV"
  done_step

  step "upgrading pip"
  pip "check that PyPI is reachable" install --upgrade pip
  done_step

  index_opts=()
  if [ -n "$P_TORCH_INDEX" ]; then
    case $TORCH_INDEX_ARG in
      none) ;;
      auto)
        if plan "$PYTHON" --probe-url "$P_TORCH_INDEX" >/dev/null 2>&1; then
          index_opts=(--extra-index-url "$P_TORCH_INDEX")
        else
          say "note: $P_TORCH_INDEX is unreachable; the +cpu torch must come from pip's own configuration (pip config list)"
        fi
        ;;
      *) index_opts=(--extra-index-url "$TORCH_INDEX_ARG") ;;
    esac
  fi
  step "installing ${P_VLLM_DIST} ${P_VLLM_VERSION}, mlx, mlx-lm (the longest step)"
  pip "check that vLLM $P_VLLM_VERSION exists for $P_PLATFORM (--vllm-version) and that PyPI is reachable" \
    install ${index_opts[@]+"${index_opts[@]}"} "${STACK_REQS[@]}"
  done_step
fi

step "installing vmetal from $REPO"
if [ "$DEV" = 1 ]; then
  pip "fix the error above in $REPO/pyproject.toml or its dependencies" install --editable "${REPO}[test]"
else
  pip "fix the error above in $REPO/pyproject.toml or its dependencies" install "$REPO"
fi
done_step

if [ -n "$P_REMOVE" ]; then
  read -r -a REMOVE <<<"$P_REMOVE"
  step "removing ${P_REMOVE// /, } (CUDA builds that break beside CPU torch)"
  pip "uninstall them by hand: $VPY -m pip uninstall -y $P_REMOVE" uninstall --yes "${REMOVE[@]}"
  done_step
fi

if [ "$P_VLLM_DIST" != vllm ]; then
  # vLLM's own `vllm` script dies at start under any other distribution name (its
  # --version reads importlib.metadata.version("vllm")); point it at vmetal's
  # launcher, which answers that lookup and then runs vLLM's CLI unchanged.
  step "making the \`vllm\` command work under the ${P_VLLM_DIST} distribution"
  run "check that $VENV/bin is writable" "$VPY" -c '
import sys, pathlib
script = pathlib.Path(sys.argv[1])
script.write_text("#!" + sys.argv[2] + "\nimport sys\nfrom vmetal.server.vllm_cli import main\nif __name__ == \"__main__\":\n    sys.exit(main())\n")
script.chmod(0o755)
' "$VENV/bin/vllm" "$VPY"
  done_step
fi

step "checking the installed versions, then the smoke test"
run_in_root "the venv does not match the pins above; re-run install.sh to rebuild it" \
  "$VPY" "$PLAN_PY" --check --with-vmetal ${plan_args[@]+"${plan_args[@]}"}
run_in_root "fix the import error above (with --dev, in $REPO)" \
  "$VPY" -c "import vllm, mlx.core, mlx_lm, vmetal"
done_step

step "marking the venv as created by vmetal ($P_MARKER)"
marker_args=(--write-marker "$MARKER" --source "$REPO")
[ "$DEV" = 0 ] || marker_args+=(--editable)
run_in_root "check that $VENV is writable" "$VPY" "$PLAN_PY" "${marker_args[@]}" ${plan_args[@]+"${plan_args[@]}"}
if [ "$DRY_RUN" = 0 ]; then
  rm -f "$IN_PROGRESS"
  ROLLBACK="" # from here on the new venv stays, whatever happens
fi
if [ "$MODE" = rebuild ]; then
  run "remove $OLD by hand" rm -rf "$OLD"
fi
done_step

if [ "$DRY_RUN" = 1 ]; then
  say "dry run: nothing was changed (mode: $MODE)"
  exit 0
fi
say ""
say "vmetal is installed in $VENV ($MODE, $((SECONDS - STARTED)) s): $P_VLLM_DIST $P_VLLM_VERSION, mlx $P_MLX_EXTRA."
say "Next:"
say "  source $(quote_args "$VENV/bin/activate")"
