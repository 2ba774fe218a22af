"""Ending a finished torch.distributed test worker without interpreter finalization.

After a gloo worker has written its results and destroyed its process group, the process
sometimes aborts while the interpreter finalizes ("terminate called without an active
exception", SIGABRT): gdb shows gloo's ``ProcessGroupGloo::runLoop`` threads still running
while ``Py_FinalizeEx``'s garbage collection runs. Seen with torch 2.14.1 in about one launch
in 20 to 60, with ``TRITON_INTERPRET=1`` set as the test-suite sets it. The results are
complete by then; only the exit status turned to -6 and failed the test. Workers call
:func:`exit_now` once their files are written, so their status says whether their work
succeeded.
"""

import os
import sys


def exit_now() -> None:
    """Flush the standard streams and end the process with status 0, skipping finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
