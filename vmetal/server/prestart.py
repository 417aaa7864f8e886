"""Start the EngineCore's interpreter while the API server is still importing vLLM.

Why: `vmetal serve` answered ~14 s after it started here, and two stretches of that are the same work done one
after the other. The API server process imports vLLM (~7 s: torch, inductor, transformers, the OpenAI
protocol), and only then spawns the EngineCore, whose fresh interpreter imports most of the same modules again
(~5 s) before it loads a model. Fork would skip the second import, but a process that has touched MLX or Metal
must not fork (see `vmetal.register`); vLLM's forkserver branch is not reachable either
(`VLLM_WORKER_MULTIPROC_METHOD` accepts only fork and spawn). So this module keeps spawn's semantics and moves
its cost: when the server child starts, one interpreter is spawned at once and imports the EngineCore's modules
in parallel with the API server's own imports, then waits. When vLLM starts its first EngineCore process, the
process object goes to that interpreter over the same pickled pipe protocol `multiprocessing.spawn` uses (with
the parent's environment as of `start()`), instead of to a new interpreter. The child is never forked from
anything, so what holds for spawn on a Mac holds here.

A process whose pickled arguments carry file descriptors (a multiprocessing queue, say) cannot be handed to an
interpreter that is already running, and is spawned the ordinary way; so is every process but the first
EngineCore. The waiting interpreter leaves as soon as its parent does, used or not.

Only the standard library is imported here: this runs before vLLM in the API server process.
"""

from __future__ import annotations

import importlib
import io
import os
import sys
import threading
from collections.abc import Callable, Sequence

# What the EngineCore process imports before it loads a model; mlx and the platform come with it (the engine
# core resolves vLLM's platform, which imports vmetal's).
PRELOAD = ("vllm.v1.engine.core",)
# vLLM names its engine processes "EngineCore" and, with data parallel, "EngineCore_DP<rank>".
ENGINE_PROCESS_PREFIX = "EngineCore"


class WarmInterpreter:
    """A spawned interpreter that has imported `preload` and waits for one process object."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        from multiprocessing import resource_tracker, spawn, util

        resource_tracker.ensure_running()
        tracker_fd = resource_tracker.getfd()
        data_r, self.data_w = os.pipe()
        # The child holds the write end of `sentinel` until it exits: the parent's `Process.sentinel`.
        self.sentinel, sentinel_w = os.pipe()
        # The parent holds the write end of `alive` until it exits: how a child still importing learns it is
        # not wanted any more.
        alive_r, self.alive_w = os.pipe()
        code = (f"from vmetal.server.prestart import child_main; "
                f"child_main({data_r}, {alive_r}, {tracker_fd}, {tuple(preload)!r})")
        args = [spawn.get_executable(), *util._args_from_interpreter_flags(), "-c", code]
        self._open: tuple[int, ...] = (self.data_w, self.sentinel, self.alive_w)
        try:
            self.pid = util.spawnv_passfds(spawn.get_executable(), args, [tracker_fd, data_r, sentinel_w, alive_r])
        except BaseException:
            self.close()
            raise
        finally:
            for fd in (data_r, sentinel_w, alive_r):
                os.close(fd)

    def send(self, payload: bytes) -> None:
        with open(self.data_w, "wb", closefd=False) as pipe:
            pipe.write(payload)

    def close(self) -> None:
        """Close this side's ends: an unused child then leaves (it also leaves when this process exits)."""
        fds, self._open = self._open, ()
        for fd in fds:
            os.close(fd)


def child_main(data_fd: int, alive_fd: int, tracker_fd: int, preload: Sequence[str]) -> None:
    """The waiting interpreter: import, wait for the process object, then run it as spawn's child would."""
    from multiprocessing import process, reduction, resource_tracker, spawn

    resource_tracker._resource_tracker._fd = tracker_fd
    taken = threading.Event()

    def leave_with_parent() -> None:
        os.read(alive_fd, 1)  # b"" once the parent has exited or closed its end
        if not taken.is_set():
            os._exit(0)

    threading.Thread(target=leave_with_parent, name="vmetal-prestart-parent", daemon=True).start()
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the process imports it again and reports the error where it belongs
            pass
    _ready_process_title()
    with os.fdopen(data_fd, "rb", closefd=False) as from_parent:
        try:
            environ = reduction.pickle.load(from_parent)
        except EOFError:
            os._exit(0)
        taken.set()
        os.environ.clear()
        os.environ.update(environ)
        process.current_process()._inheriting = True
        try:
            spawn.prepare(reduction.pickle.load(from_parent))
            process_obj = reduction.pickle.load(from_parent)
        finally:
            del process.current_process()._inheriting
    # As in spawn: the data pipe's read end tells the process when its parent is gone.
    sys.exit(process_obj._bootstrap(parent_sentinel=data_fd))


def _ready_process_title() -> None:
    """Let setproctitle find this process's argv before the environment is replaced.

    vLLM names its processes with setproctitle ("VLLM::EngineCore": what `ps`, psutil and users see). Its
    set-up, done at first use, locates argv through the C environment block, which `os.environ.clear()` moves;
    after that every title is silently dropped. Set up first, it keeps working.
    """
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.getproctitle()


def _popen_class() -> type:
    from multiprocessing import popen_spawn_posix, reduction, spawn, util
    from multiprocessing.context import set_spawning_popen

    class WarmPopen(popen_spawn_posix.Popen):
        """spawn's Popen, but the process runs in a `WarmInterpreter` when it can."""

        def __init__(self, process_obj, warm: WarmInterpreter) -> None:
            self._warm = warm
            super().__init__(process_obj)

        def _launch(self, process_obj) -> None:
            prep_data = spawn.get_preparation_data(process_obj._name)
            payload = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(dict(os.environ), payload)
                reduction.dump(prep_data, payload)
                reduction.dump(process_obj, payload)
            finally:
                set_spawning_popen(None)
            warm = self._warm
            try:
                if self._fds:
                    # Descriptors go to a child at exec time; this one was exec'd long ago.
                    raise OSError("the process object carries file descriptors")
                warm.send(payload.getvalue())
            except OSError:  # that, or the waiting interpreter is gone (a broken pipe): spawn as usual
                warm.close()
                self._fds = []
                super()._launch(process_obj)
                return
            self.pid = warm.pid
            self.sentinel = warm.sentinel
            self.finalizer = util.Finalize(self, warm.close)

    return WarmPopen


def install(preload: Sequence[str] = PRELOAD) -> WarmInterpreter | None:
    """Start a warm interpreter and route this process's first spawned EngineCore to it.

    Returns the interpreter, or None where spawn is not how processes start (Windows) or it could not start.
    """
    if sys.platform == "win32":
        return None
    from multiprocessing import context

    try:
        warm = WarmInterpreter(preload)
    except OSError:
        return None
    warm_popen = _popen_class()
    spawn_popen: Callable = context.SpawnProcess._Popen
    state = {"warm": warm}

    def popen(process_obj):
        ready = state["warm"]
        if ready is None or not str(process_obj.name).startswith(ENGINE_PROCESS_PREFIX):
            return spawn_popen(process_obj)
        state["warm"] = None
        return warm_popen(process_obj, ready)

    context.SpawnProcess._Popen = staticmethod(popen)
    return warm
