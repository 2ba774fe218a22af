"""Where the tests find the released ACE-LoRA checkpoint (``ACE_LoRA.pt``, MIT, ICON Lab).

In order: the file named by ``ACE_LORA_RELEASED``; the workplace's copy beside the repository
(``<repo>/../shared/reference``, what the issues name); the copy kept with the tests
(``tests/data``, with its licence), so that a clone anywhere, CI's included, tests against the
real file rather than skipping. The copy's bytes are checked against the published SHA-256.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CANONICAL = REPO_ROOT.parent / "shared" / "reference" / "ACE_LoRA.pt"
VENDORED = Path(__file__).resolve().parent / "data" / "ACE_LoRA.pt"
RELEASED_SHA256 = "65044d097103d6fde7bca7b08a31f4ed728b5d805de371e7e5163440e5e0ee41"


def released_path() -> Path:
    named = os.environ.get("ACE_LORA_RELEASED")
    if named:
        return Path(named)
    return CANONICAL if CANONICAL.is_file() else VENDORED
