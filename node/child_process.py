"""What ``serve``'s supervised child processes have in common, whatever they run (analysis workers,
``node.jobs.supervisor``; receivers, ``node.receiver.processes``): they die with ``serve``, log where it logs,
are restarted after the same backoff, and are reported dead in the same words; ``ChildProcesses`` watches
them, the same way for both."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import ClassVar, Generic, TypeVar

from node.jobs import registry

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
HEALTHY_AFTER_S = 60.0  # a child that lived this long starts again at FIRST_BACKOFF_S when it dies

_PR_SET_PDEATHSIG = 1


def log_target() -> tuple[str | None, int]:
    """Where this (serve's) process logs, to hand to a child: its log file, if any (else the child logs to the
    standard error it inherits), and its level."""
    root = logging.getLogger()
    log_file = next((h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)), None)
    return log_file, root.level


def log_like_serve(log_file: str | None, level: int | str) -> None:
    """In a child: log where and as ``serve`` does (``log_target``), in its format."""
    from node.service import configure_logging

    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    configure_logging(level, handler)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when the thread that started it ends, so none outlives ``serve``
    (even one killed with SIGKILL); exits at once when the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(3)


def short_exit(code: int | None) -> str:
    """An exit code as a word: "SIGKILL", "exit code 3"."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def how_ended(code: int | None) -> str:
    """How a child ended, for its row and the log: "killed by SIGKILL", "exit code 3"."""
    short = short_exit(code)
    return f"killed by {short}" if code is not None and code < 0 else short


@dataclass
class Slot:
    """One supervised child: the process now running in it (none while it waits for its restart)."""

    number: int
    process: BaseProcess | None = None
    name: str = ""  # its row in the workers table
    started: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None  # monotonic time of the next start, while waiting for the backoff
    deaths: int = 0
    events: Connection | None = None  # the child's one-way pipe to serve, read here


S = TypeVar("S", bound=Slot)


class ChildProcesses(Generic[S]):
    """Starts, watches and restarts a fixed set of spawned children from one thread, reading each one's pipe.

    One thread does it all: a child asks the kernel to kill it when the thread that started it ends, and one
    ``wait`` on every sentinel and pipe sees a death or a message at once. Subclasses say what to run, what a
    message means, what a death costs and how to stop (the hooks below)."""

    what: ClassVar[str]  # in the log: "analysis worker", "receiver process"
    process_name: ClassVar[str]  # the process's name, formatted with the slot number
    slot_prefix: ClassVar[str] = ""  # a row is named <host>:<pid>:<prefix><number>

    def __init__(self, slots: list[S]) -> None:
        self.slots = slots
        self.log = logging.getLogger(type(self).__module__)  # the subclass's logger, as before the base existed
        self._context = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # slot.process (and subclass fields) as other threads read them
        self._grace_s = 0.0

    def _start_watching(self, thread_name: str) -> None:
        self._wake_r, self._wake_w = os.pipe()  # stop() writes it: the watching thread waits on it too
        self._thread = threading.Thread(target=self._watch, name=thread_name, daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop every child (``_shutdown``, given ``grace_s``); returns when all are gone."""
        if self._thread is None:
            return
        self._grace_s = grace_s
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def pids(self) -> dict[str, int]:
        """Live child name -> pid (for tests and logs)."""
        with self._lock:
            return {s.name: s.process.pid for s in self.slots if s.process is not None and s.process.pid}

    # -- the hooks ---------------------------------------------------------------------------------------

    def _target_args(self, slot: S, events: Connection | None) -> tuple[Callable[..., None], tuple[object, ...]]:
        """The child's entry point and its (picklable) arguments; ``events`` is its end of the pipe."""
        raise NotImplementedError

    def _wants_events(self) -> bool:
        """Whether a child gets a pipe to serve (none when nothing would read it)."""
        return True

    def _on_message(self, slot: S, kind: str, args: tuple[object, ...]) -> None:
        """One message from the child: ``(kind, args)``."""

    def _on_died(self, slot: S, code: int | None) -> bool:
        """Record and log an unexpected death (``code``: its exit code); False: do not start it again."""
        raise NotImplementedError

    def _on_start_failed(self, slot: S, exc: OSError) -> None:
        """The process could not be started (out of processes or memory): by default, try again later."""
        self._schedule_restart(slot)

    def _shutdown(self, grace_s: float) -> None:
        """Stop every child, on the watching thread (after the loop), within about ``grace_s``."""
        raise NotImplementedError

    # -- the watching thread -----------------------------------------------------------------------------

    def _watch(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)
            waits = [s.restart_at - now for s in self.slots if s.process is None and s.restart_at is not None]
            timeout = max(0.05, min([1.0, *waits]))
            sentinels = {s.process.sentinel: s for s in self.slots if s.process is not None}
            events = {s.events: s for s in self.slots if s.events is not None}
            ready = wait([*sentinels, *events, self._wake_r], timeout=timeout)
            for handle in ready:
                if handle in events:
                    self._read(events[handle])
            for handle in ready:
                if handle in sentinels and not self._stop.is_set():
                    self._died(sentinels[handle])
        self._shutdown(self._grace_s)

    def _spawn(self, slot: S) -> None:
        # One pipe per child, written by it alone: a child killed mid-write can garble only its own.
        reader, writer = self._context.Pipe(duplex=False) if self._wants_events() else (None, None)
        target, args = self._target_args(slot, writer)
        process = self._context.Process(target=target, args=args, name=self.process_name.format(slot.number))
        try:
            process.start()
        except OSError as exc:  # out of processes or memory
            self.log.error("cannot start %s %d: %s", self.what, slot.number, exc)
            for end in (reader, writer):
                if end is not None:
                    end.close()
            self._on_start_failed(slot, exc)
            return
        if writer is not None:
            writer.close()  # the child has its copy; EOF on the reader once the child is gone
        with self._lock:
            slot.process, slot.started, slot.restart_at, slot.events = process, time.monotonic(), None, reader
            slot.name = registry.worker_name(f"{self.slot_prefix}{slot.number}", process.pid)
        self.log.info("%s %s started (pid %d)", self.what, slot.name, process.pid)

    def _read(self, slot: S) -> None:
        """Take what the child sent (``_on_message``); drop its pipe at its end or at a garbled message."""
        connection = slot.events
        if connection is None:
            return
        try:
            while connection.poll():
                kind, args = connection.recv()
                self._on_message(slot, kind, args)
        except (EOFError, OSError, ValueError, TypeError):  # the child ended (perhaps mid-message)
            self._close_events(slot)
        except Exception:  # a garbled message: what it reports is not worth the supervision
            self.log.exception("%s %s: unreadable message; ignoring its messages from now on", self.what, slot.name)
            self._close_events(slot)

    def _close_events(self, slot: S) -> None:
        if slot.events is not None:
            slot.events.close()
            slot.events = None

    def _died(self, slot: S) -> None:
        process = slot.process
        assert process is not None
        self._read(slot)  # what it said before it died
        self._close_events(slot)
        process.join(timeout=5)
        code = process.exitcode
        lived = time.monotonic() - slot.started
        with self._lock:
            slot.process = None
        process.close()
        slot.deaths += 1
        if not self._on_died(slot, code):
            return
        if lived >= HEALTHY_AFTER_S:
            slot.backoff_s = FIRST_BACKOFF_S
        self._schedule_restart(slot)

    def _reap(self, slot: S, grace_s: float) -> int | None:
        """In ``_shutdown``, once the grace period is over: SIGKILL the child if it still runs, take its last
        messages and free its slot; returns its exit code."""
        process = slot.process
        assert process is not None
        if process.is_alive():
            self.log.warning("%s %s did not stop within %g s; killing it", self.what, slot.name, grace_s)
            process.kill()
        process.join(timeout=10)
        self._read(slot)
        self._close_events(slot)
        code = process.exitcode
        with self._lock:
            slot.process = None
        process.close()
        return code

    def _schedule_restart(self, slot: S) -> None:
        slot.restart_at = time.monotonic() + slot.backoff_s
        self.log.info("%s slot %d: restarting in %g s", self.what, slot.number, slot.backoff_s)
        slot.backoff_s = min(slot.backoff_s * 2, MAX_BACKOFF_S)
