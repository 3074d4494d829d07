"""Packed-file bytes taken apart and put back together, independently of ringq.packing.

The tests craft malformed and malicious files with these: ``with_header`` rewrites
a file's JSON header (its payload kept), so one field at a time can be broken.
"""
import json
import struct
import zlib


def split(data):
    """(header dict, payload bytes) of packed file bytes, read without the loader."""
    (length,) = struct.unpack_from("<I", data, 8)
    return json.loads(zlib.decompress(data[12:12 + length])), data[12 + length:]


def join(header_bytes, payload):
    """Packed file bytes from raw (uncompressed) header bytes and a payload."""
    blob = zlib.compress(header_bytes)
    return b"RINGQPK1" + struct.pack("<I", len(blob)) + blob + payload


def with_header(data, edit):
    """Packed bytes whose header is ``edit(header)``'s result (or the header edited in place)."""
    header, payload = split(data)
    header = edit(header) or header
    return join(json.dumps(header).encode(), payload)


def rewrite_header(source, target, edit):
    """Write ``source``'s packed file to ``target`` with its header edited; returns ``target``."""
    target.write_bytes(with_header(source.read_bytes(), edit))
    return target
