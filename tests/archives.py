"""Zip archives for the app-archive tests, honest and lying.

The lying ones are honest zips whose central directory was patched: that is where
``zipfile`` reads each member's CRC-32 and size from, so nothing but reading the data through
catches the lie.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

SCRIPT = "client.py"
PAYLOAD = b"print('hello')\n" * 100
CENTRAL_HEADER = b"PK\x01\x02"
CRC_AT, SIZE_AT, FLAGS_AT = 16, 24, 8


def honest_zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def patch_central(data: bytes, name: str, offset: int, value: int, width: int = 4) -> bytes:
    """``data`` with the field at ``offset`` of ``name``'s central directory entry set to
    ``value`` (a little-endian integer of ``width`` bytes)."""
    start = data.find(CENTRAL_HEADER)
    while start != -1:
        (name_length,) = struct.unpack_from("<H", data, start + 28)
        if data[start + 46 : start + 46 + name_length] == name.encode():
            patched = bytearray(data)
            struct.pack_into("<I" if width == 4 else "<H", patched, start + offset, value)
            return bytes(patched)
        start = data.find(CENTRAL_HEADER, start + 4)
    raise AssertionError(f"{name} is not in the central directory")


def lying_crc() -> bytes:
    data = honest_zip({SCRIPT: PAYLOAD, "util.py": b"X = 1\n"})
    return patch_central(data, "util.py", CRC_AT, zlib.crc32(b"something else"))


def lying_small_size() -> bytes:
    # Declares 10 bytes for a member that inflates to 1,500.
    data = honest_zip({SCRIPT: b"pass\n", "data.txt": PAYLOAD})
    return patch_central(data, "data.txt", SIZE_AT, 10)


def lying_large_size() -> bytes:
    data = honest_zip({SCRIPT: b"pass\n", "data.txt": PAYLOAD})
    return patch_central(data, "data.txt", SIZE_AT, len(PAYLOAD) + 1000)


def zip_bomb() -> bytes:
    # 8 MiB of zeros deflate to a few KiB; declared as 100 bytes, it passes a check that only
    # adds up declared sizes.
    data = honest_zip({SCRIPT: b"pass\n", "bomb.bin": bytes(8 << 20)})
    return patch_central(data, "bomb.bin", SIZE_AT, 100)


def encrypted() -> bytes:
    data = honest_zip({SCRIPT: PAYLOAD})
    return patch_central(data, SCRIPT, FLAGS_AT, 1, width=2)


# name: (make, the member the refusal must name)
LIARS = {
    "a CRC that does not match": (lying_crc, "util.py"),
    "a zip bomb declaring a small size": (zip_bomb, "bomb.bin"),
    "a declared size smaller than the data": (lying_small_size, "data.txt"),
    "a declared size larger than the data": (lying_large_size, "data.txt"),
    "an encrypted member": (encrypted, SCRIPT),
}
