"""Run a test module's ahead-of-time sm_90a compiles in a fresh interpreter.

Under TRITON_INTERPRET=1 (set for the whole CPU test session) the kernels are not
JITFunctions and cannot be compiled, so the compiles run in a child process
without it. The child imports ``tests/<module>.py`` and prints the JSON that
``<function>(*args)`` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_MARK = "AOT-RESULTS:"


def compile_in_fresh_process(module: str, function: str, *args, timeout: float = 900) -> list:
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import {module} as m; "
            f"print({_MARK!r} + json.dumps(m.{function}(*{args!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split(_MARK, 1)[1])
