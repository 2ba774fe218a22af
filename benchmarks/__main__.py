"""Entry point of ``python -m benchmarks``."""

import os
import signal
import sys

from benchmarks import PARENT_PID_VARIABLE


def _die_with_parent() -> None:
    """In a family's process: be killed (SIGKILL) when the suite's process dies, however it dies
    (Linux ``PR_SET_PDEATHSIG``; the suite kills its worker itself on SIGTERM/SIGINT, this covers
    SIGKILL, e.g. ``timeout -k``'s). Done before torch is imported, to shorten the window in which
    the suite could die unnoticed; a suite already gone by then is caught by the parent check."""
    parent = os.environ.pop(PARENT_PID_VARIABLE, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except Exception:  # no prctl: the suite's own SIGTERM handler still kills this process
        return
    if os.getppid() != int(parent):  # the suite died before the prctl took effect
        os._exit(1)


if __name__ == "__main__":
    _die_with_parent()
    from benchmarks.suite import main

    sys.exit(main())
