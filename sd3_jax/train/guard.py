"""What keeps a training run's workdir whole: one run at a time, and a checkpoint when the scheduler stops it.

`workdir_lock` holds an exclusive `flock` on WORKDIR/.lock with the holder's pid in it: a second
`sd3-jax train` on the same workdir is refused with that pid, and since the kernel drops the lock with the
process, a killed run leaves nothing stale. `Preemption` turns SIGTERM (what pod schedulers send before
SIGKILL) into a flag the loop checks after each step, to save a checkpoint at that step and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from collections.abc import Iterator


class WorkdirBusy(ValueError):
    """Another live run holds the workdir."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint of the current step was saved."""


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds WORKDIR/.lock for the duration (only where `enabled`: process 0 of a multi-host run)."""
    if not enabled:
        yield
        return
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirBusy(
                f"{workdir} is in use by a running sd3-jax train (pid {holder}); stop it or use another "
                "--workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock


class Preemption:
    """While active, SIGTERM sets `requested` instead of killing the process (main thread only).

    Single-process runs only (`enabled`): the hosts of a multi-host run would see the signal at different
    steps and must agree on the step to save (orbax's preemption sync point), which is not wired here.
    """

    def __init__(self, enabled: bool = True):
        self.requested = False
        self.enabled = enabled
        self._previous = None

    def __enter__(self) -> Preemption:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class HeldThreadOutput:
    """sys.stderr for a training run: the main thread writes straight through; other threads' writes are
    held until `release()` (passed on, in order) or `drop()`.

    Orbax writes checkpoints from its own threads, and when the disk fills each of them prints the error it
    met (absl tracebacks, TensorStore callbacks on a closed event loop) before the loop hears of it. The
    loop releases held output once a checkpoint is known to be complete, so nothing is lost on a good run,
    and drops it when a write failed: its one `CheckpointWriteError` line says what happened.
    """

    def __init__(self, stream):
        self._stream = stream
        self._held: list[str] = []
        self._lock = threading.Lock()
        self.hold_main = False  # hold the main thread's writes too (while it waits on a checkpoint write)

    def write(self, text: str) -> int:
        if not self.hold_main and threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        with self._lock:
            self._held.append(text)
        return len(text)

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        if held:
            self._stream.write("".join(held))
            self._stream.flush()

    def drop(self) -> None:
        with self._lock:
            self._held = []

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding...: the real stream's
        return getattr(self._stream, name)


@contextlib.contextmanager
def held_thread_output() -> Iterator[HeldThreadOutput]:
    """Installs a `HeldThreadOutput` as sys.stderr for the block (and as the stream of logging handlers
    that hold the old one); what is still held at the end is released."""
    import logging
    import sys

    old = sys.stderr
    held = HeldThreadOutput(old)
    handlers = [
        h
        for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        if isinstance(lg, logging.Logger)
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and h.stream is old
    ]
    sys.stderr = held
    for h in handlers:
        h.setStream(held)
    try:
        yield held
        held.release()
    finally:
        sys.stderr = old
        for h in handlers:
            h.setStream(old)
