"""Install pinned requirements one distribution at a time.

``python .ci/pip_install_stepwise.py torch==2.11.0 triton==3.6.0 ...`` installs each argument
and then, breadth first, each dependency not yet satisfied (those whose markers hold here), one
``pip install --no-deps`` call per distribution, then runs ``pip check``. One pip call
downloads every wheel it resolves before it installs any, so a CUDA build of torch in one call
needs its ~3 GB of wheels on the disk beside the ~5 GB they unpack to; here the disk holds the
installed packages and one package's wheels at a time. CI's machines differ in free disk, and stop 13's CI ran out of it
installing torch 2.11 in one call.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections import deque

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _satisfied(requirement: Requirement) -> bool:
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(installed, prereleases=True)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: pip_install_stepwise.py REQUIREMENT [REQUIREMENT ...]", file=sys.stderr)
        return 2
    # Breadth first, so that a requirement's own pins (torch's nvidia-* versions) are installed
    # before a looser requirement on the same package from further down.
    # Each entry: a requirement and the extras its parent was asked with (its marker's "extra").
    queue = deque((Requirement(spec), frozenset()) for spec in argv)
    expanded: set[tuple[str, frozenset]] = set()  # (name, extras) whose dependencies are queued
    while queue:
        requirement, parent_extras = queue.popleft()
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": extra})
                                          for extra in ("", *sorted(parent_extras))):
            continue
        if not _satisfied(requirement):
            _pip("install", "-q", "--no-deps", f"{requirement.name}{requirement.specifier}")
        extras = frozenset(requirement.extras)
        key = (canonicalize_name(requirement.name), extras)
        if key in expanded:
            continue
        expanded.add(key)
        queue.extend((Requirement(text), extras)
                     for text in importlib.metadata.requires(requirement.name) or [])
    _pip("check")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
