"""Packed model files: quantized weights as bit-packed level indices, no pickle.

File layout (integers little-endian)::

    8 bytes  magic b"RINGQPK1"
    4 bytes  uint32 length H of the compressed header
    H bytes  zlib-compressed UTF-8 JSON header
    rest     payload: the tensor blobs at the header's offsets

The header holds the format version, the model ``config`` (``build_model``'s
keys), the rings (float32 values written as JSON numbers, which round-trip
float32 bit-exactly), one record per tensor and the sha256 of the payload. A
model converted by :func:`ringq.quantize_model` has no ``build_model`` config: its
``config`` holds the quantization keys only and ``network`` its class
(``module.QualName``); such a file loads into that model, built and converted
the same way (``load_packed(path, model=...)``).

A ring layer's *level table* is the distinct values (bit patterns) of its
ring, sorted; each weight is stored as the index of its hard value in that
table, ``bits = max(1, ceil(log2(levels)))`` per weight. ``ring_indices[k]`` is
one ring index holding level k; loading sets each position to
``ring_index / N`` so the hard weights are exactly those of the source.
Positions themselves are not stored.

A uniform K-bit layer (record kind ``uniform``, format version 2) stores each
weight's integer level q in [-2**(K-1), 2**(K-1)-1] as ``q + 2**(K-1)`` in K
bits, and its per-output-channel ``steps`` (float32, as JSON numbers); loading
sets the latent weight to ``q * step`` and the step, so the K-bit weights are
exactly those of the source. Version 1 files (ring records only) still load.

Every other state-dict tensor (a quantized layer's bias and output scale too) is
stored raw: float32 (float16 with ``half=True``), int64 as int64.

Each quantized layer kind has one codec (``CODECS``, by record kind): the
layer's codes (levels, a level index per weight, bits), its record fields, the
tensors rebuilt from a record and the state-dict entries they fill. A new kind
of layer adds one codec and touches nothing else.

Loading reads JSON, zlib and raw numbers only; nothing in a file is executed.
The header's config is untrusted: it is checked (:mod:`ringq.trust`) and the
shapes it implies are matched against the records before the model is built.
"""
import hashlib
import json
import math
import os
import struct
import zlib

import numpy as np
import torch

from models import build_model
from models.ring_math import SAME_VALUE_TOL, hard_indices
from models.ring_layers import RingLayer
from models.uniform_layers import MAX_BITS as MAX_UNIFORM_BITS
from models.uniform_layers import MIN_BITS as MIN_UNIFORM_BITS
from models.uniform_layers import STEP_MIN, UniformLayer, UniformQuantizer, integer_range
from models.utils import quantized_layers, set_weight_mode

from .atomic import write_atomic
from .errors import CheckpointError
from .trust import check_model_config, meta_model

MAGIC = b"RINGQPK1"
FORMAT = "ringq-packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_BITS = 8

_PREFIX = struct.Struct("<8sI")
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int64": np.dtype("<i8")}
_MAX_HEADER_BYTES = 64 << 20
_HEADER_FIELDS = (("config", dict), ("half", bool), ("rings", list), ("tensors", list),
                  ("payload_bytes", int), ("payload_sha256", str), ("extra", dict))
_RECORD_FIELDS = (("kind", str), ("dtype", str), ("shape", list), ("offset", int), ("nbytes", int))
_CODE_FIELDS = (("bits", int), ("count", int))


class _FormatError(Exception):
    """Why a packed file is unusable; the public functions prefix the path."""


def _expect(condition, reason):
    if not condition:
        raise _FormatError(reason)


# --- bit packing --------------------------------------------------------------

def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")


def packed_nbytes(count, bits):
    """Bytes that ``count`` values of ``bits`` bits take once packed."""
    return (count * bits + 7) // 8


def pack_bits(indices, bits):
    """Pack integers in [0, 2**bits) into ``ceil(count*bits/8)`` bytes.

    indices: 1-D integer tensor or array [count]. Bit order is little-endian:
    value k fills stream bits [k*bits, (k+1)*bits), lowest bit first, and stream
    bit j is bit j % 8 of byte j // 8; unused high bits of the last byte are 0.
    """
    _check_bits(bits)
    values = np.asarray(indices.detach().cpu() if torch.is_tensor(indices) else indices)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got shape {values.shape} "
                         f"and dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"indices must lie in [0, {1 << bits}) for {bits} bits, "
                         f"got [{values.min()}, {values.max()}]")
    per_value = np.unpackbits(values.astype(np.uint8)[:, None], axis=1, count=bits,
                              bitorder="little")
    return np.packbits(per_value.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data, bits, count):
    """Inverse of :func:`pack_bits`: int64 tensor [count] from ``data`` (bytes-like)."""
    _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    expected = packed_nbytes(count, bits)
    if len(data) != expected:
        raise ValueError(f"{count} values of {bits} bits take {expected} bytes, got {len(data)}")
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits,
                           bitorder="little")
    values = np.packbits(stream.reshape(count, bits), axis=1, bitorder="little")
    return torch.from_numpy(values.reshape(count).astype(np.int64))


def _key(layer_name, attr):
    return f"{layer_name}.{attr}" if layer_name else attr


# --- level tables ----------------------------------------------------------------

def level_table(ring):
    """Level table of a ring [N] (any float tensor, read as float32).

    Returns (levels float32 [L]: distinct bit patterns sorted by value,
    ring_indices int64 [L]: first ring index holding each level,
    level_of int64 [N]: level index of each ring index).
    """
    values = ring.detach().cpu().to(torch.float32).numpy()
    _, first, inverse = np.unique(values.view(np.uint32), return_index=True,
                                  return_inverse=True)
    order = np.argsort(values[first], kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return values[first[order]], first[order].astype(np.int64), rank[inverse.reshape(-1)]


def level_indices(layer):
    """(levels float32 [L], ring_indices int64 [L], level index of every weight int64 [count]).

    ``levels`` and ``ring_indices`` are the layer's :func:`level_table`; the
    weights are read in the order of ``positions.reshape(-1)``.
    """
    levels, ring_indices, level_of = level_table(layer.ring_template)
    return levels, ring_indices, level_of[layer.hard_indices().cpu().numpy().reshape(-1)]


def entropy_bits(counts):
    """Shannon entropy, in bits per weight, of a level histogram (counts >= 0, not all 0).

    The information a layer's hard weights really carry: log2(L) when all L
    levels are used equally, less when some dominate, 0 when one level holds all.
    """
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(np.sum(p * np.log2(1 / p)))


def value_entropy_bits(levels, counts, tol=SAME_VALUE_TOL):
    """:func:`entropy_bits` of a level histogram with levels closer than ``tol`` merged.

    levels: sorted level values [L]; counts: weights per level [L]. A ring may
    hold one value under two bit patterns (two packing levels, one weight value);
    the entropy counts values, as :func:`models.ring_math.distinct_values` does.
    """
    starts = np.flatnonzero(np.diff(np.asarray(levels, dtype=np.float64), prepend=-np.inf) > tol)
    return entropy_bits(np.add.reduceat(np.asarray(counts), starts))


# --- codecs: one per quantized layer kind ---------------------------------------------

class RingCodec:
    """Ring layers, record kind ``packed``: each weight as its index in the layer's level table.

    Record fields: ``levels`` (the :func:`level_table` values, float32 as JSON
    numbers), ``ring_indices`` (one ring index per level) and ``ring`` (index of
    the layer's ring in the header's ``rings``, each distinct ring stored once).
    Fills the layer's ``positions`` [shape] (``ring_index / N`` of each weight's
    level) and ``ring_template`` [N].
    """

    kind = "packed"
    since_version = 1
    layer_class = RingLayer
    description = "ring layer"
    fields = (("levels", list), ("ring_indices", list), ("ring", int))
    not_weights = ("ring_template",)  # state-dict entries that hold no weight values

    def codes(self, layer):
        levels, _, indices = level_indices(layer)
        return levels.tolist(), indices, max(1, (levels.size - 1).bit_length())

    def shape(self, layer):
        return list(layer.positions.shape)

    def mismatch(self, record, layer):
        """Why ``record`` cannot fill ``layer`` beyond its shapes (None: it can); a ring's
        size is its shape."""
        return None

    def header_fields(self, name, layer, rings):
        levels, ring_indices, _ = level_table(layer.ring_template)
        return {"levels": levels.tolist(), "ring_indices": ring_indices.tolist(),
                "ring": rings.add(name, layer.ring_template)}

    def covers(self, record, rings):
        """{state-dict entry: shape} that ``record`` fills (rings: the header's, float32)."""
        _expect(0 <= record["ring"] < len(rings),
                f"{record['name']}: ring {record['ring']} not stored")
        return {"positions": record["shape"], "ring_template": [rings[record["ring"]].size]}

    def tensors(self, record, indices, rings):
        """{positions, ring_template} from ``record`` and its level indices int64 [count]."""
        name, ring = record["name"], rings[record["ring"]]
        n = ring.size
        levels = _float32_values(record["levels"], f"{name}: levels")
        ring_indices = record["ring_indices"]
        _expect(1 <= levels.size <= 1 << record["bits"], f"{name}: {levels.size} levels do not "
                f"fit {record['bits']} bits")
        _expect(len(ring_indices) == levels.size and all(
            _is_int(i) and 0 <= i < n for i in ring_indices),
            f"{name}: ring_indices must be {levels.size} ints in [0, {n})")
        _expect(np.array_equal(ring[ring_indices].view(np.uint32), levels.view(np.uint32)),
                f"{name}: levels differ from the ring values at ring_indices")
        table = np.array(ring_indices, dtype=np.float32) / np.float32(n)
        _expect(hard_indices(torch.from_numpy(table), n).tolist() == ring_indices,
                f"{name}: ring indices cannot be represented as positions for ring size {n}")
        indices = indices.numpy()
        _expect(indices.size == 0 or indices.max() < levels.size,
                f"{name}: level index out of range")
        return {"positions": torch.from_numpy(table[indices].reshape(record["shape"])),
                "ring_template": torch.from_numpy(ring.copy())}


class UniformCodec:
    """Uniform K-bit layers, record kind ``uniform``: each weight as its integer level + 2**(K-1).

    Record field: ``steps`` (one per output channel, float32 as JSON numbers).
    Fills the layer's latent ``weight`` [shape] (level * step) and ``step`` [out].
    """

    kind = "uniform"
    since_version = 2
    layer_class = UniformLayer
    description = "uniform layer"
    fields = (("steps", list),)
    not_weights = ("step",)

    def codes(self, layer):
        qn, qp = integer_range(layer.quantizer.bits)
        indices = (layer.integers() + qn).cpu().numpy().reshape(-1)
        return list(range(-qn, qp + 1)), indices, layer.quantizer.bits

    def shape(self, layer):
        return list(layer.weight_shape)

    def mismatch(self, record, layer):
        bits = layer.quantizer.bits
        return None if record["bits"] == bits else \
            f"{record['name']}: stored at {record['bits']} bits, the model's layer has {bits}"

    def header_fields(self, name, layer, rings):
        return {"steps": layer.step.detach().clamp_min(STEP_MIN).cpu().float().tolist()}

    def covers(self, record, rings):
        name, bits, shape = record["name"], record["bits"], record["shape"]
        _expect(MIN_UNIFORM_BITS <= bits <= MAX_UNIFORM_BITS,
                f"{name}: uniform bits {bits} not in {MIN_UNIFORM_BITS}..{MAX_UNIFORM_BITS}")
        _expect(len(shape) >= 2, f"{name}: a uniform layer's shape needs >= 2 dimensions")
        return {"weight": shape, "step": shape[:1]}

    def tensors(self, record, indices, rings):
        """{weight, step} from ``record`` and its level indices int64 [count]."""
        name, shape = record["name"], record["shape"]
        steps = _float32_values(record["steps"], f"{name}: steps")
        _expect(steps.size == shape[0] and (steps >= STEP_MIN).all(),
                f"{name}: steps must be {shape[0]} numbers >= {STEP_MIN}")
        qn, _ = integer_range(record["bits"])
        step = torch.from_numpy(steps)
        weight = (indices - qn).to(torch.float32).view(shape) \
            * step.view(-1, *([1] * (len(shape) - 1)))
        return {"weight": weight, "step": step}


CODECS = {codec.kind: codec for codec in (RingCodec(), UniformCodec())}  # by record kind


def codec_of(layer):
    """The codec of a quantized layer; ValueError for a kind no codec packs."""
    for codec in CODECS.values():
        if isinstance(layer, codec.layer_class):
            return codec
    raise ValueError(f"no packed format for {type(layer).__name__} layers")


def layer_codes(layer):
    """(levels [L], level index of every weight int64 [count], bits) of a quantized layer.

    Ring layers: the :func:`level_table` values and ``max(1, ceil(log2 L))`` bits;
    uniform K-bit layers: the integer levels -2**(K-1) .. 2**(K-1)-1 and K bits.
    Weights are read in the order of the latent tensor's ``reshape(-1)``.
    """
    return codec_of(layer).codes(layer)


# --- export --------------------------------------------------------------------

class _RingTable:
    """The rings of a model being exported, each distinct one (bit for bit) stored once."""

    def __init__(self):
        self.values, self._ids = [], {}

    def add(self, name, ring):
        """Index of ``ring`` (float tensor [N]) in ``values``, appended when new."""
        ring = ring.detach().cpu().to(torch.float32)
        if not torch.isfinite(ring).all():
            raise ValueError(f"{name}: ring holds non-finite values")
        ring_id = self._ids.setdefault(ring.numpy().tobytes(), len(self.values))
        if ring_id == len(self.values):
            self.values.append(ring.tolist())
        return ring_id


def _pack_layer(name, layer, rings):
    """Header record (offset not set yet) and packed bytes of one quantized layer."""
    codec = codec_of(layer)
    levels, indices, bits = codec.codes(layer)
    if bits > MAX_BITS:
        raise ValueError(f"{name}: {len(levels)} levels need {bits} bits, at most {MAX_BITS} "
                         f"can be packed")
    record = {"name": name, "kind": codec.kind, "dtype": "float32", "shape": codec.shape(layer),
              "count": int(indices.size), "bits": bits}
    record.update(codec.header_fields(name, layer, rings))
    return record, pack_bits(indices, bits)


def _raw_tensor_bytes(key, tensor, half):
    """(header dtype, little-endian bytes) of one non-quantized tensor."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.int64:
        return "int64", tensor.numpy().astype(_DTYPES["int64"]).tobytes()
    if not tensor.is_floating_point():
        raise ValueError(f"{key}: cannot store dtype {tensor.dtype}")
    dtype = "float16" if half else "float32"
    values = tensor.float().numpy()
    with np.errstate(over="ignore"):
        stored = values.astype(_DTYPES[dtype])
    if np.any(np.isinf(stored) & np.isfinite(values)):
        raise ValueError(f"{key}: values exceed the float16 range; export without half")
    return dtype, stored.tobytes()


def _check_config(model, config):
    """Raise ValueError unless ``build_model(config)`` has the model's state-dict layout."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        built = build_model(config)
    expected = {k: tuple(t.shape) for k, t in built.state_dict().items()}
    actual = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if expected != actual:
        raise ValueError("config does not describe the model: state-dict names or shapes differ")


def _packed_keys(layers):
    """State-dict keys that the codecs of ``layers`` ({name: quantized layer}) fill."""
    return {_key(name, k) for name, layer in layers.items() for k in layer.latent_names}


def quantization_config(model):
    """The ``build_model`` quantization keys of a quantized model, read off its quantizer."""
    quantizer = quantized_layers(model)[0][1].quantizer
    if isinstance(quantizer, UniformQuantizer):
        return {"quantization": "uniform", "bits": quantizer.bits}
    return {"quantization": "ring", "ring_size": quantizer.ring_size,
            "ring_type": quantizer.ring_type, "ring_layout": quantizer.layout,
            "interpolation": quantizer.interpolation, "sigma": quantizer.sigma}


def _entries(model, half):
    """(rings, [(record, blob)]) for every quantized layer, then every other tensor."""
    rings, entries = _RingTable(), []
    layers = dict(quantized_layers(model))
    for name, layer in layers.items():
        entries.append(_pack_layer(name, layer, rings))
    packed_keys = _packed_keys(layers)
    for key, tensor in model.state_dict().items():
        if key not in packed_keys:
            dtype, blob = _raw_tensor_bytes(key, tensor, half)
            entries.append(({"name": key, "kind": "raw", "dtype": dtype,
                             "shape": list(tensor.shape)}, blob))
    return rings.values, entries


def _write(path, header, payload):
    """Write a packed file (atomically); returns its prefix + header bytes."""
    header_blob = zlib.compress(
        json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8"), 9)
    prefix = _PREFIX.pack(MAGIC, len(header_blob))
    write_atomic(path, lambda f: f.writelines((prefix, header_blob, payload)))
    return len(prefix) + len(header_blob)


def export_packed(model, config, path, half=False, extra=None):
    """Write ``model`` as a packed file at ``path`` (atomically); returns stats.

    config: the dict ``build_model`` rebuilds the model from (JSON-serialisable), or
    None for a model of your own (converted by :func:`ringq.quantize_model`);
    half: store non-quantized float tensors as float16; extra: JSON-serialisable dict
    returned by :func:`load_packed`. Stats: file/header/payload/packed/raw
    bytes, quantized_weights, bits_per_layer {layer: bits}, half.
    """
    if not quantized_layers(model):
        raise ValueError("nothing to pack: the model has no quantized layers")
    network = {}
    if config is None:
        config = quantization_config(model)
        network = {"network": f"{type(model).__module__}.{type(model).__qualname__}"}
    else:
        _check_config(model, config)
    rings, entries = _entries(model, half)
    offset = 0
    for record, blob in entries:
        record.update(offset=offset, nbytes=len(blob))
        offset += len(blob)
    payload = b"".join(blob for _, blob in entries)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "config": dict(config),
              "half": bool(half), "rings": rings, "tensors": [r for r, _ in entries],
              "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "extra": dict(extra or {}),
              **network}
    header_bytes = _write(path, header, payload)
    packed = [r for r, _ in entries if r["kind"] in CODECS]
    return {"file_bytes": header_bytes + len(payload), "header_bytes": header_bytes,
            "payload_bytes": len(payload),
            "packed_bytes": sum(r["nbytes"] for r in packed),
            "raw_bytes": len(payload) - sum(r["nbytes"] for r in packed),
            "quantized_weights": sum(r["count"] for r in packed),
            "bits_per_layer": {r["name"]: r["bits"] for r in packed}, "half": bool(half)}


# --- reading -------------------------------------------------------------------

def is_packed_file(path):
    """True when ``path`` starts with the packed-file magic (reads 8 bytes only)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _decode_header(blob):
    """Header dict from its zlib-compressed JSON bytes."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(blob, _MAX_HEADER_BYTES)
        complete = inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data
        header = json.loads(text.decode("utf-8")) if complete else None
    except (zlib.error, ValueError, RecursionError) as e:
        raise _FormatError(f"corrupt header ({type(e).__name__}: {e})") from None
    _expect(complete, "corrupt header (incomplete, oversized or trailing zlib data)")
    _expect(isinstance(header, dict), "corrupt header (not a JSON object)")
    _expect(header.get("format") == FORMAT, "header is not a ringq packed header")
    _expect(header.get("version") in READABLE_VERSIONS,
            f"unsupported format version {header.get('version')!r} (expected one of "
            f"{', '.join(map(str, READABLE_VERSIONS))})")
    for field, kind in _HEADER_FIELDS:
        _expect(isinstance(header.get(field), kind), f"header field {field!r} missing or not a "
                f"{kind.__name__}")
    return header


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(record, fields, name):
    for field, kind in fields:
        ok = _is_int(record.get(field)) if kind is int else isinstance(record.get(field), kind)
        _expect(ok, f"{name}: field {field!r} missing or not a {kind.__name__}")


def _check_record(record, payload_bytes, version):
    """Format-level checks of one tensor record: fields, shape, byte range, sizes."""
    _expect(isinstance(record, dict) and isinstance(record.get("name"), str),
            "tensor record without a name")
    name = record["name"]
    _check_fields(record, _RECORD_FIELDS, name)
    _expect(all(_is_int(d) and d >= 0 for d in record["shape"]), f"{name}: bad shape")
    offset, nbytes = record["offset"], record["nbytes"]
    _expect(0 <= offset and 0 <= nbytes and offset + nbytes <= payload_bytes,
            f"{name}: bytes [{offset}, {offset + nbytes}) lie outside the "
            f"{payload_bytes}-byte payload")
    numel = math.prod(record["shape"])
    if record["kind"] == "raw":
        _expect(record["dtype"] in _DTYPES, f"{name}: unknown dtype {record['dtype']!r}")
        size = numel * _DTYPES[record["dtype"]].itemsize
    else:
        codec = CODECS.get(record["kind"])
        _expect(codec is not None and codec.since_version <= version,
                f"{name}: unknown kind {record['kind']!r}")
        _check_fields(record, _CODE_FIELDS + codec.fields, name)
        _expect(record["dtype"] == "float32", f"{name}: packed levels must be float32")
        _expect(1 <= record["bits"] <= MAX_BITS, f"{name}: bits {record['bits']} not in "
                f"1..{MAX_BITS}")
        _expect(record["count"] == numel, f"{name}: count {record['count']} does not match "
                f"shape {record['shape']}")
        size = packed_nbytes(numel, record["bits"])
    _expect(nbytes == size, f"{name}: {nbytes} bytes stored, {size} expected")


def _read_packed(path):
    """(header, payload memoryview) of a packed file, format-checked; raises _FormatError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _FormatError(f"cannot read ({e.strerror or e})") from None
    _expect(data, "empty file")
    _expect(len(data) >= _PREFIX.size, "truncated (shorter than the file prefix)")
    magic, header_bytes = _PREFIX.unpack_from(data)
    _expect(magic == MAGIC, "not a ringq packed file (bad magic)")
    end = _PREFIX.size + header_bytes
    _expect(end <= len(data), "truncated (header runs past the end of the file)")
    header = _decode_header(data[_PREFIX.size:end])
    payload = memoryview(data)[end:]
    _expect(len(payload) == header["payload_bytes"],
            f"payload is {len(payload)} bytes, header says {header['payload_bytes']} (truncated?)")
    _expect(hashlib.sha256(payload).hexdigest() == header["payload_sha256"],
            "payload sha256 mismatch (corrupted file)")
    for record in header["tensors"]:
        _check_record(record, len(payload), header["version"])
    return header, payload


def _float32_values(values, what):
    """float32 array [n] from a JSON list, which must hold exact finite float32 numbers."""
    _expect(isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
        f"{what} is not a list of numbers")
    wide = np.array(values, dtype=np.float64)
    single = wide.astype(np.float32)
    _expect(np.isfinite(wide).all() and np.array_equal(single.astype(np.float64), wide),
            f"{what} holds values that are not finite float32 numbers")
    return single


def _raw_tensor(record, payload):
    """Tensor [shape] (stored dtype) of a raw record."""
    dtype = _DTYPES[record["dtype"]]
    values = np.frombuffer(payload, dtype=dtype, count=math.prod(record["shape"]),
                           offset=record["offset"])
    return torch.from_numpy(values.astype(dtype.newbyteorder("="))).reshape(record["shape"])


def _layout(header, model):
    """Check the records against ``model`` (its shapes only: built on the meta device).

    Returns (plan [(record, codec or None for raw)], rings [float32 arrays]).
    Every state-dict entry of the model must be filled by exactly one record,
    with its shape, before anything is decoded or the real model is built.
    """
    expected = {k: list(t.shape) for k, t in model.state_dict().items()}
    layers = dict(quantized_layers(model))
    packed_keys = _packed_keys(layers)
    rings = [_float32_values(r, f"ring {i}") for i, r in enumerate(header["rings"])]
    plan, shapes = [], {}
    for record in header["tensors"]:
        name = record["name"]
        if record["kind"] == "raw":
            _expect(name in expected and name not in packed_keys,
                    f"unexpected raw tensor {name!r} for this model")
            codec, covered = None, {name: record["shape"]}
        else:
            codec = CODECS[record["kind"]]
            _expect(isinstance(layers.get(name), codec.layer_class),
                    f"{name!r} is not a {codec.description} of this model")
            covered = {_key(name, k): shape for k, shape in codec.covers(record, rings).items()}
            problem = codec.mismatch(record, layers[name])
            _expect(problem is None, problem)
        _expect(not covered.keys() & shapes.keys(), f"{name}: stored twice")
        shapes.update(covered)
        plan.append((record, codec))
    missing = sorted(expected.keys() - shapes.keys())
    _expect(not missing, f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for key, shape in shapes.items():
        _expect(shape == expected[key], f"{key}: stored shape {shape} does not match the "
                f"model's {expected[key]}")
    return plan, rings


def _decode(plan, payload, rings):
    """State dict from a checked :func:`_layout` plan and the payload."""
    state = {}
    for record, codec in plan:
        if codec is None:
            state[record["name"]] = _raw_tensor(record, payload)
            continue
        start = record["offset"]
        indices = unpack_bits(payload[start:start + record["nbytes"]], record["bits"],
                              record["count"])
        state.update({_key(record["name"], k): t
                      for k, t in codec.tensors(record, indices, rings).items()})
    return state


def load_packed(path, map_location="cpu", model=None):
    """Load a packed file: (model in hard + eval mode, config, extra).

    Without ``model`` the model is ``build_model(config)`` (on ``map_location``) with
    the stored rings and tensors and positions ``ring_index / N``, so its hard weights
    equal the source's bit for bit. The config is untrusted: it is checked, and the
    shapes it implies are matched against the stored records, before the model is
    built. With ``model`` (a network of your own, converted as the file's was) the
    records are matched against it and its state replaced in place, where it is. Any
    unreadable, corrupt or mismatched file raises :class:`CheckpointError`
    ``"<path>: <reason>"`` (a mismatch names the first layer that does not fit).
    """
    try:
        header, payload = _read_packed(path)
        config = header["config"]
        if model is None:
            if "network" in header:
                raise _FormatError(f"holds a {str(header['network'])[:100]} converted by "
                                   f"ringq.quantize_model, not a build_model network; build and "
                                   f"convert that model the same way and pass it: "
                                   f"load_packed(path, model)")
            config = check_model_config(config, f"{path}: config")
        target = meta_model(config, f"{path}: config") if model is None else model
        plan, rings = _layout(header, target)
        state = _decode(plan, payload, rings)
    except _FormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if model is None:
        model = build_model(config).to(map_location)
    model.load_state_dict(state)
    set_weight_mode(model, "hard")
    model.eval()
    return model, config, header["extra"]


def rewrite_extra(path, extra):
    """Replace the ``extra`` of the packed file at ``path`` (atomically); returns the file size.

    Every other header field and the payload stay byte-identical, so the file
    loads to exactly the same model. extra: a JSON-serialisable dict.
    """
    try:
        header, payload = _read_packed(path)
    except _FormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return _write(path, {**header, "extra": dict(extra)}, payload) + len(payload)


def size_report(model, packed_path):
    """Sizes of ``model`` and its packed file at ``packed_path`` (dict).

    fp32_state_dict_bytes: the state dict of the same network held as an
    ordinary FP32 one, sum of numel * 4 over its entries, counting one float32
    per quantized weight (positions, latent weights) and no ring buffer or
    steps. ratio = fp32_state_dict_bytes / file_bytes; quantized_layers_ratio
    = 32 * quantized_weights / sum over quantized layers of bits * count
    (padding excluded). levels_per_layer: ring values, or the integer levels of
    a uniform layer; level_counts_per_layer: weights per level (levels sorted
    by value); entropy_bits_per_layer: :func:`value_entropy_bits` of those
    counts; quantized_entropy_bits: sum over quantized layers of entropy *
    count, the bits an ideal entropy coder would need for the quantized layers.
    """
    try:
        header, _ = _read_packed(packed_path)
    except _FormatError as e:
        raise CheckpointError(f"{packed_path}: {e}") from None
    packed = [r for r in header["tensors"] if r["kind"] in CODECS]
    layers = quantized_layers(model)
    codes = [layer_codes(layer) for _, layer in layers]
    if [(r["name"], r["count"]) for r in packed] != [(n, c[1].size) for (n, _), c in
                                                      zip(layers, codes)]:
        raise CheckpointError(f"{packed_path}: packed quantized layers do not match the model")
    skip = {_key(name, k) for name, layer in layers for k in codec_of(layer).not_weights}
    fp32_bytes = 4 * sum(t.numel() for k, t in model.state_dict().items() if k not in skip)
    file_bytes = os.path.getsize(packed_path)
    weights = sum(r["count"] for r in packed)
    bits = sum(r["bits"] * r["count"] for r in packed)
    levels = {name: c[0] for (name, _), c in zip(layers, codes)}
    counts = {name: np.bincount(c[1], minlength=len(c[0])) for (name, _), c in zip(layers, codes)}
    entropy = {name: value_entropy_bits(levels[name], counts[name]) for name in levels}
    return {"file_bytes": file_bytes, "fp32_state_dict_bytes": fp32_bytes,
            "ratio": fp32_bytes / file_bytes, "quantized_weights": weights,
            "quantized_bits": bits, "quantized_layers_ratio": 32 * weights / bits,
            "bits_per_layer": {r["name"]: r["bits"] for r in packed},
            "levels_per_layer": levels,
            "level_counts_per_layer": {name: c.tolist() for name, c in counts.items()},
            "entropy_bits_per_layer": entropy,
            "quantized_entropy_bits": sum(entropy[r["name"]] * r["count"] for r in packed),
            "half": header["half"]}
