"""Canonical safetensors bytes: the same tensors and metadata always give the same file.

The `safetensors` package writes its string metadata from a hash map whose order changes from
one save to the next, so two saves of an equal delta differed in bytes and sha256. Rewriting the
header with the metadata keys sorted (tensor entries and data untouched, the header padded with
spaces to 8 bytes as the format allows) makes a file's sha256 a function of its content.
"""
from __future__ import annotations

import json

HEADER_LENGTH_BYTES = 8
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"


def canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its metadata keys in sorted order."""
    size = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    header = json.loads(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + size])
    if METADATA_KEY in header:
        header[METADATA_KEY] = dict(sorted(header[METADATA_KEY].items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    return (len(encoded).to_bytes(HEADER_LENGTH_BYTES, "little") + encoded
            + data[HEADER_LENGTH_BYTES + size:])
