"""Which CUDA toolkit builds the extension ``ace_kernels._C``: one rule for setup.py (which loads this
file by path, as the package needs torch) and the Makefile, which runs it as a script with any Python
(``python ace_kernels/_cuda_toolkit.py`` prints the nvcc found and exits 0, or why there is none and
exits 1), so that the two cannot disagree on whether a machine has one. The standard library only.

The toolkit is the one torch's cpp_extension builds with: CUDA_HOME's, else CUDA_PATH's (the first
set), else /usr/local/cuda when it has an nvcc, else that of the nvcc on PATH (after /usr/local/cuda:
an nvcc wrapper script in /usr/local/bin is no toolkit).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import NamedTuple

DEFAULT_HOME = "/usr/local/cuda"


class Toolkit(NamedTuple):
    variable: str | None  # the variable that names ``home`` (CUDA_HOME for the default), None for PATH's nvcc
    home: str | None      # the toolkit's folder, None for PATH's nvcc (or none)
    nvcc: str | None      # home's bin/nvcc (which may be missing: see reason), else PATH's nvcc, else None
    reason: str | None    # why no build can use it; None when nvcc is there


def find(environ=None) -> Toolkit:
    """The toolkit ``environ`` (``os.environ`` by default) names, as torch's cpp_extension reads it."""
    environ = os.environ if environ is None else environ
    variable = next((name for name in ("CUDA_HOME", "CUDA_PATH") if environ.get(name)), None)
    home = environ[variable] if variable else None
    if variable is None and os.path.exists(os.path.join(DEFAULT_HOME, "bin", "nvcc")):
        variable, home = "CUDA_HOME", DEFAULT_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc", path=environ.get("PATH"))
    if home and not os.path.exists(nvcc):
        return Toolkit(variable, home, nvcc, f"no nvcc at {nvcc} ({variable}={home!r})")
    if not nvcc:
        return Toolkit(None, None, None, "no nvcc found (put it on PATH or set CUDA_HOME)")
    return Toolkit(variable, home, nvcc, None)


def main() -> int:
    toolkit = find()
    print(toolkit.reason or toolkit.nvcc)
    return 1 if toolkit.reason else 0


if __name__ == "__main__":
    sys.exit(main())
