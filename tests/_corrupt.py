"""Damage a torch file the way a disk or a copy can: bits flipped inside a stored tensor."""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path


def flip_a_bit_in_a_stored_tensor(path: Path) -> str:
    """Flip the lowest bit of the first byte of the first non-empty tensor stored in the torch file
    ``path`` (a zip, members stored uncompressed), in place; returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename) and i.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_length + extra_length] ^= 1
    path.write_bytes(bytes(raw))
    return info.filename
