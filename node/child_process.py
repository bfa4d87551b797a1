"""What ``serve``'s supervised child processes have in common, whatever they run (analysis workers,
``node.jobs.supervisor``; receivers, ``node.receiver.processes``): they die with ``serve``, log where it logs,
are restarted after the same backoff, and are reported dead in the same words."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

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
