"""The fingerprint of the CUDA extension's sources (``csrc/``).

setup.py compiles it into ``ace_kernels._C`` (as ``SOURCES_SHA256``); in a checkout, the cuda
backend compares it with the ``csrc/`` beside the package before it runs the kernels, so that an
extension built from other sources (an in-place build the sources have moved on from) is not run
as this one. Standard library only: setup.py loads this file by its path, without the package.
"""

from __future__ import annotations

import hashlib
import os

SUFFIXES = (".cu", ".cuh", ".cpp", ".hpp", ".h")


def sources_sha256(csrc: str) -> str | None:
    """sha256 over every source file under ``csrc``: each one's path (relative, ``/``-separated)
    and bytes, in path order. None when it holds no source file. Hidden files and folders (a name
    starting with '.') are left out, as setup.py's glob leaves them out of the build: an editor's
    lock file (Emacs's ``.#hypergraph.cu``, a link to nowhere) is no source."""
    found = {}
    for folder, folders, names in os.walk(csrc):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if name.endswith(SUFFIXES) and not name.startswith("."):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, csrc).replace(os.sep, "/")] = path
    if not found:
        return None
    digest = hashlib.sha256()
    for relative in sorted(found):
        with open(found[relative], "rb") as handle:
            data = handle.read()
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
