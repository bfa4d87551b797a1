"""``[node] receiver_processes`` > 1: serve's DICOM receiver as N child processes on one port.

One Python process ingests only as fast as its GIL lets it (issue 16), so ``serve`` can start N processes
("spawn", like the analysis workers of ``node.jobs.supervisor``) that each run a full ``Receiver``: its own
AE and associations (``max_associations`` each), its own ``InstanceStore`` and group commit, its own audit
events, over the shared data directory and database. Each sets SO_REUSEPORT before binding ``host:port``; the
kernel spreads incoming connections over them.

Each child registers in the workers table (role ``receiver``), beats, and reports in its row's detail how many
instances it stored and refused. It sends serve, over its own one-way pipe, "listening" (or why it cannot)
and, when serve has metrics, each C-STORE observation (``StoreObserver``), which serve passes to its metrics.

Serve watches the children from one thread. One that dies unexpectedly (``kill -9``, a crash) is logged, its
row marked ``exited`` with how, and started again after a backoff (1 s doubling to 60 s); the others serve
meanwhile. SIGHUP in serve is passed on (each child reads its TLS files again). Stopping: SIGTERM to each
(``Receiver.stop``: stores in flight finish, later ones get 0xA700; exit 0), SIGKILL after a grace period.
A child asks the kernel to kill it when the thread that started it ends (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from node.child_process import ChildProcesses, Slot, die_with_parent, how_ended, log_like_serve, log_target
from node.config import NodeConfig
from node.db.database import Database
from node.jobs import registry
from node.receiver.observer import StoreObserver
from node.receiver.server import unwatch_for_tls_reload, watch_for_tls_reload

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a spawned interpreter imports pynetdicom, pydicom and SQLAlchemy first
STOP_GRACE_S = 15.0  # Receiver.stop gives open associations 10 s; then SIGKILL
ROLE = "receiver"

# Messages from a child: ("listening", (host, port)), ("cannot_listen", (errno, why)), and the StoreObserver
# calls ("stored", (sop_class_uid, seconds)) and ("refused", (status, seconds)).
_OBSERVED = ("stored", "refused")


@dataclass
class _Slot(Slot):
    ready: bool = False  # it said it listens
    cannot_listen: tuple[int, str] | None = None  # (errno, why), when it said it cannot


class ReceiverProcesses(ChildProcesses[_Slot]):
    """Starts, watches and restarts the receiver processes; see the module docstring."""

    what = "receiver process"
    process_name = "uad-node-receiver-{}"
    slot_prefix = "r"

    def __init__(self, config: NodeConfig, db: Database, observer: StoreObserver | None = None) -> None:
        super().__init__([_Slot(number) for number in range(1, config.node.receiver_processes + 1)])
        self.config, self.db, self.observer = config, db, observer
        self._up = threading.Event()  # every child listening, or the start failed (``_start_failure``)
        self._start_failure: OSError | None = None

    # -- serve's side ----------------------------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every child and return once all listen. OSError when one cannot (the port is taken: its errno
        and words) or they do not within ``timeout_s``; every child is stopped then."""
        for name in registry.mark_gone_on_this_host(self.db, role=ROLE):
            log.warning("receiver process %s of a previous serve is gone; marked exited", name)
        self._start_watching("receiver-processes")
        if not self._up.wait(timeout_s):
            self._start_failure = OSError(errno.ETIMEDOUT, f"receiver processes not listening after {timeout_s:g} s")
        if self._start_failure is not None:
            self.stop()
            raise self._start_failure
        watch_for_tls_reload(self)
        log.info(
            "%d receiver processes listening on %s:%d (pids %s)",
            len(self.slots), self.config.node.host, self.config.node.port,
            ", ".join(str(pid) for pid in self.pids().values()),
        )  # fmt: skip

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every child, wait up to ``grace_s``, SIGKILL the rest; returns when all are gone."""
        if self._thread is not None:
            unwatch_for_tls_reload(self)
        super().stop(grace_s)

    @property
    def listening(self) -> bool:
        """True while every child is alive and listening (readiness): the watching thread clears ``ready`` the
        moment a child's process ends."""
        with self._lock:
            return all(s.process is not None and s.ready for s in self.slots)

    def reload_tls(self) -> bool:
        """SIGHUP to every listening child: each reads its TLS files again (``Receiver.reload_tls``)."""
        if not self.config.tls.enabled:
            return False
        with self._lock:
            pids = [s.process.pid for s in self.slots if s.process is not None and s.ready and s.process.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:  # died meanwhile: its replacement reads the files anyway
                pass
        log.info("SIGHUP passed on to %d receiver process(es)", len(pids))
        return bool(pids)

    # -- the hooks, on the watching thread -------------------------------------------------------------

    def _target_args(self, slot: _Slot, events: Connection | None) -> tuple[Callable[..., None], tuple[object, ...]]:
        log_file, level = log_target()
        forward = self.observer is not None
        return receiver_main, (self.config, slot.number, os.getpid(), log_file, level, events, forward)

    def _on_message(self, slot: _Slot, kind: str, args: tuple[object, ...]) -> None:
        """Its listening (or why not), and its C-STORE observations for the metrics."""
        if kind in _OBSERVED and self.observer is not None:
            getattr(self.observer, kind)(*args)
        elif kind == "listening":
            with self._lock:
                slot.ready = True
            if not self._up.is_set() and all(s.ready for s in self.slots):
                self._up.set()
            elif self._up.is_set():
                log.info("receiver process %s listening again", slot.name)
        elif kind == "cannot_listen":
            slot.cannot_listen = (int(args[0] or 0), str(args[1]))

    def _on_died(self, slot: _Slot, code: int | None) -> bool:
        how = how_ended(code)
        slot.ready, cannot_listen, slot.cannot_listen = False, slot.cannot_listen, None
        if cannot_listen is not None:
            how = f"cannot listen: {cannot_listen[1]}"
        try:
            registry.mark(self.db, slot.name, "exited", how)
        except Exception:
            log.exception("receiver process %s %s; cannot record it", slot.name, how)
        if not self._up.is_set():  # during serve's start: serve gives up (as with one in-process receiver)
            code_errno, why = cannot_listen or (0, f"receiver process {how}")
            self._start_failed(OSError(code_errno, why) if code_errno else OSError(why))
            return False
        log.error("receiver process %s %s; the other receiver processes keep serving", slot.name, how)
        return True

    def _on_start_failed(self, slot: _Slot, exc: OSError) -> None:
        if not self._up.is_set():
            self._start_failed(exc)
        else:
            self._schedule_restart(slot)

    def _start_failed(self, exc: OSError) -> None:
        if self._start_failure is None:
            self._start_failure = exc
        self._up.set()

    def _shutdown(self, grace_s: float) -> None:
        running = [s for s in self.slots if s.process is not None]
        for slot in running:
            assert slot.process is not None
            try:
                os.kill(slot.process.pid or 0, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        # Keep reading while they stop: stores in flight still report, and a full pipe would hold a child up.
        while (alive := [s for s in running if s.process is not None and s.process.is_alive()]) and (
            remaining := deadline - time.monotonic()
        ) > 0:
            events = {s.events: s for s in running if s.events is not None}
            ready = wait([*(s.process.sentinel for s in alive if s.process is not None), *events], timeout=remaining)
            for handle in ready:
                if handle in events:
                    self._read(events[handle])
        for slot in running:
            code = self._reap(slot, grace_s)
            if code != 0:  # a clean stop marks its own row
                try:
                    registry.mark(self.db, slot.name, "exited", how_ended(code))
                except Exception:
                    log.exception("receiver process %s: cannot record its exit", slot.name)


# -- the child's side -----------------------------------------------------------------------------------


class _PipeObserver:
    """The child's ``StoreObserver``: counts what it stored and refused (its row's detail) and, when serve
    keeps metrics, sends each call there. Never raises: metrics must not fail a C-STORE."""

    def __init__(self, connection: Connection, forward: bool) -> None:
        self._connection, self._forward = connection, forward
        self._lock = threading.Lock()
        self.stored_count = 0
        self.refused_count = 0

    def send(self, kind: str, *args: object) -> None:
        try:
            with self._lock:
                self._connection.send((kind, args))
        except (OSError, ValueError):  # serve is gone or stopping: nothing to report to
            pass

    def stored(self, sop_class_uid: str, seconds: float) -> None:
        with self._lock:
            self.stored_count += 1
        if self._forward:
            self.send("stored", sop_class_uid, seconds)

    def refused(self, status: int, seconds: float) -> None:
        with self._lock:
            self.refused_count += 1
        if self._forward:
            self.send("refused", status, seconds)

    def summary(self) -> str:
        return f"{self.stored_count} instances stored, {self.refused_count} refused"


def receiver_main(
    config: NodeConfig,
    slot: int,
    parent_pid: int,
    log_file: str | None,
    log_level: int | str,
    events: Connection,
    forward_metrics: bool,
) -> None:
    """The process entry point (picklable: a module-level function of plain arguments): one ``Receiver`` on the
    shared port until SIGTERM."""
    die_with_parent(parent_pid)
    from node.receiver.server import reload_tls_files

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: serve decides, then tells us
    # SIGHUP (passed on by serve): read the TLS files again, on a thread (not inside the signal handler).
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=reload_tls_files, name="sighup").start())
    log_like_serve(log_file, log_level)
    code = _run(config, slot, parent_pid, stopping, _PipeObserver(events, forward_metrics))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(config: NodeConfig, slot: int, parent_pid: int, stopping: threading.Event, observer: _PipeObserver) -> int:
    from node.db.database import open_database
    from node.receiver.server import Receiver

    name = registry.worker_name(f"r{slot}")
    db = open_database(config.node.effective_database_url(), migrate=False)  # serve migrated it
    registry.register(db, name, os.getpid(), {}, role=ROLE)
    receiver = Receiver(config=config, db=db, observer=observer, reuse_port=True)
    try:
        host, port = receiver.start()
    except OSError as exc:
        why = exc.strerror or str(exc)
        log.error("receiver process %s cannot listen on %s:%d: %s", name, config.node.host, config.node.port, why)
        observer.send("cannot_listen", exc.errno, why)
        registry.mark(db, name, "exited", f"cannot listen: {why}")
        db.close()
        return 1
    _beat(db, name, observer)
    observer.send("listening", host, port)
    while not stopping.wait(registry.HEARTBEAT_S):
        if os.getppid() != parent_pid:  # serve is gone (PR_SET_PDEATHSIG missed it): stop taking images
            log.error("receiver process %s: serve (pid %d) is gone; exiting", name, parent_pid)
            os._exit(3)
        _beat(db, name, observer)
    receiver.stop()
    try:
        registry.mark(db, name, "stopped", f"stopped by serve; {observer.summary()}")
    except Exception:
        log.exception("receiver process %s: cannot record its stop", name)
    db.close()
    log.info("receiver process %s stopped: %s", name, observer.summary())
    return 0


def _beat(db: Database, name: str, observer: _PipeObserver) -> None:
    try:
        registry.heartbeat(db, name, "ready", {}, None, observer.summary())
    except Exception:  # the next beat tries again
        log.exception("receiver process %s: heartbeat failed", name)
