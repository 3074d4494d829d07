"""The k-bit network as one ONNX file that onnxruntime runs, its weights stored at 2-8 bits.

    report = export_onnx(model, "resnet20_ring4.onnx")          # or export_checkpoint_onnx
    logits = run_onnx("resnet20_ring4.onnx", images)            # onnxruntime, CPU
    result = evaluate_onnx("resnet20_ring4.onnx", test_split)   # uint8 ArrayDataset

How the file is made. The model's hard network (what a k-bit deployment computes;
a soft model exports its hard network, and the report says so) is materialised as
a plain FP32 copy: every quantized conv / linear becomes ``nn.Conv2d`` /
``nn.Linear`` holding its hard weights. torch's TorchScript exporter
(``dynamo=False``; the dynamo one needs onnxscript) writes that copy at opset 20;
onnx's version converter lifts it to opset 25 (IR 13), the first opset whose
DequantizeLinear takes int2 / uint2. BatchNorm is not folded into the convolutions
(that would change the weights): each inference BatchNorm is written as the per-
channel ``x * scale + shift`` that PyTorch's CPU kernel computes from it (Mul + Add,
2 vectors instead of 4), so every quantized weight stays an initializer of its own,
equal to the hard weights. Each quantized layer's FP32 weight initializer is then
replaced by a packed low-bit initializer and the nodes that rebuild the weights,
exactly (every dequantized value equals the PyTorch hard weight in float32; this
is checked on the layer's levels before writing):

* ring layer, levels an arithmetic progression that are integer multiples of one
  step (ring-8 distinct: +-1/8 .. +-7/8 as odd codes -7..7 of int4, step 1/8):
  ``DequantizeLinear(int codes, step)``;
* ring layer, levels in steps of ``d`` but not multiples of it (triangle ring-4
  distinct +-1/4, +-3/4: 0 is never a level): int2 codes -2..1, then
  ``Add(DequantizeLinear(codes, d), offset)`` (d = 1/2, offset = 1/4);
* any other ring (a sin ring; a published-layout ring whose float32 levels are not
  exact steps, e.g. ring-8's -1, -3/7, 1/7, 5/7): unsigned level index,
  ``DequantizeLinear(index, 1)``, ``Cast`` to int64, ``Gather(levels)``: the layer's
  float32 levels verbatim;
* uniform K-bit layer (LSQ / PTQ): ``DequantizeLinear(integer levels, step per
  output channel, axis 0)``, the product ``level * step`` that PyTorch computes.

Storage: the fewest bits ONNX has for the levels: int2 / uint2 up to 4 levels (a
1-bit ring too), int4 / uint4 up to 16 (a 3-bit network costs 4 bits: ONNX has no
3-bit type), int8 / uint8 up to 256. FP32 layers (classifier, an FP32 stem) and
the BatchNorm terms stay FP32. Linear layers go out as Gemm (a zero bias), not
MatMul: onnxruntime fuses DequantizeLinear(int4) -> MatMul into MatMulNBits, which
computes with int8-quantized activations, not the k-bit network. The file is one
file (no external data), checked with ``onnx.checker.check_model(full_check=True)``,
and records the input normalisation (``ringq.data.NORMALIZATION``), the class
count and a marker that this repository wrote it (producer ``ringq``, metadata
``ringq.format``), which :func:`check_onnx_file` requires. The input ``images`` is
float32 [N, C, H, W] normalised as the repository's loaders do ((x / 255 - mean) /
std), N dynamic; the output ``logits`` is [N, classes].

onnx, onnxruntime and ml_dtypes are imported only when used.
"""
import copy
import importlib
import io
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models import CIFAR_MODELS
from models.quant_layers import QuantizedConv2d, QuantizedLinear
from models.ring_layers import RING_LAYERS
from models.uniform_layers import STEP_MIN, UNIFORM_LAYERS
from models.utils import quantized_layers, set_weight_mode

from .atomic import write_atomic
from .data import NORMALIZATION
from .data import normalize as data_normalize
from .errors import CheckpointError, DataError, RingqError

PRODUCER = "ringq"
FORMAT_KEY = "ringq.format"
FORMAT = "ringq-onnx-1"
OPSET = 25            # DequantizeLinear takes int2 / uint2 from opset 25 (int4 from 21)
TORCH_OPSET = 20      # the newest opset torch's TorchScript exporter writes
INPUT_NAME, OUTPUT_NAME = "images", "logits"
BATCH_DIM = "batch"
STORAGE_BITS = (2, 4, 8)  # the integer widths ONNX has, smallest first
EXPORTER = f"torch.onnx.export(dynamo=False) at opset {TORCH_OPSET}, onnx version converter"


def _require(name, package):
    """Import module ``name``, or a RingqError saying to install ``package``."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RingqError(f"ONNX files need {name} ({e}); pip install '{package}'") from None


def _onnx():
    """The onnx module, with ml_dtypes (numpy int2 / int4 types) loaded beside it."""
    _require("ml_dtypes", "ml_dtypes>=0.5")
    return _require("onnx", "onnx>=1.20")


def _ort():
    return _require("onnxruntime", "onnxruntime>=1.24")


def ir_version_for(opset):
    """The IR version that the ONNX release introducing ``opset`` wrote (13 for opset 25).

    onnx's ``make_model`` stamps its own newest IR, which an older onnxruntime refuses.
    """
    from onnx import helper
    for _, ir, ai_onnx, *_ in helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir
    raise ValueError(f"this onnx knows no opset {opset}")


# ---------------------------------------------------------------------------------------------
# Exact forms of a layer's weights
# ---------------------------------------------------------------------------------------------

def _storage_bits(levels):
    """Fewest ONNX integer bits holding ``levels`` distinct codes (None: more than 256)."""
    need = max(1, math.ceil(math.log2(max(levels, 1))))
    return next((b for b in STORAGE_BITS if b >= need), None)


def _signed_range(bits):
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _same(a, b):
    """float32 arrays equal value for value (0.0 == -0.0: the same product in a conv)."""
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _scale_forms(levels, bits):
    """Candidate (codes, scale) with levels == float32(codes * scale), codes signed ``bits``."""
    lo, hi = _signed_range(bits)
    values = levels.astype(np.float64)
    if len(levels) == 1:
        yield (np.array([0]), np.float32(1.0)) if values[0] == 0 else \
            (np.array([1]), np.float32(levels[0]))
        return
    spacing = values[1] - values[0]
    for step in (spacing, spacing / 2):
        multiples = values / step
        codes = np.rint(multiples)
        if np.abs(multiples - codes).max() > 1e-4 or codes.min() < lo or codes.max() > hi:
            continue
        codes = codes.astype(np.int64)
        biggest = int(np.argmax(np.abs(codes)))
        for scale in dict.fromkeys((np.float32(step),
                                    np.float32(values[biggest] / codes[biggest]))):
            yield codes, scale


def _offset_forms(levels, bits):
    """Candidate (codes, scale, offset): levels == float32(float32(codes * scale) + offset)."""
    lo, hi = _signed_range(bits)
    values = levels.astype(np.float64)
    if len(levels) < 2:
        return
    spacing = values[1] - values[0]
    ranks = (values - values[0]) / spacing
    k = np.rint(ranks)
    if np.abs(ranks - k).max() > 1e-4:
        return
    k = k.astype(np.int64)
    span = int(k[-1])
    if span > hi - lo:
        return
    # code of the lowest level: the centred choice first (ring-4: -2, -1, 0, 1)
    bases = sorted(range(lo, hi - span + 1), key=lambda b: (abs(2 * b + span), -b))
    for base in bases:
        codes = k + base
        for scale in dict.fromkeys((np.float32(spacing),
                                    np.float32((values[-1] - values[0]) / max(span, 1)))):
            for offset in dict.fromkeys((np.float32(values[0] - base * np.float64(scale)),
                                         np.float32(values[-1] - codes[-1] * np.float64(scale)))):
                yield codes, scale, offset


def _ring_form(levels):
    """The exact form of a ring layer with sorted distinct float32 ``levels``; None: too many."""
    bits = _storage_bits(len(levels))
    if bits is None:
        return None
    for codes, scale in _scale_forms(levels, bits):
        if _same((codes.astype(np.float32) * scale).astype(np.float32), levels):
            return {"form": "scale", "bits": bits, "signed": True, "level_codes": codes,
                    "scale": scale}
    for codes, scale, offset in _offset_forms(levels, bits):
        rebuilt = (codes.astype(np.float32) * scale).astype(np.float32) + offset
        if _same(rebuilt.astype(np.float32), levels):
            return {"form": "scale+offset", "bits": bits, "signed": True, "level_codes": codes,
                    "scale": scale, "offset": offset}
    return {"form": "table", "bits": bits, "signed": False,
            "level_codes": np.arange(len(levels)), "levels": levels}


def _hard_weight(layer):
    """The layer's hard weights, float32 numpy [weight_shape] (the model is in hard mode)."""
    with torch.no_grad():
        return layer.quantized_weight().detach().view(layer.weight_shape).float().cpu().numpy()


def _ring_plan(name, layer, weight):
    """Codes and form of a ring layer's ``weight``; None to keep it FP32 (over 256 levels)."""
    ring = layer.ring_template.detach().float().cpu().numpy()
    levels = np.unique(ring)  # exact float32 values: a repeated level with other bits is its own
    position = np.searchsorted(levels, weight)
    snapped = ring[layer.hard_indices().cpu().numpy()].reshape(weight.shape)
    if not (np.array_equal(levels[np.minimum(position, len(levels) - 1)], weight)
            and np.array_equal(snapped, weight)):
        raise RingqError(f"{name}: hard weights are not the ring values at the hard indices")
    form = _ring_form(levels)
    if form is None:
        return None
    codes = form.pop("level_codes")[position]
    table = form.pop("levels", None)
    return {"name": name, "kind": "ring", "codes": codes, "axis": None, **form,
            "levels": len(levels), "nominal_bits": math.log2(layer.ring_size),
            "levels_table": table}


def _uniform_plan(name, layer, weight):
    """Integer levels and per-channel steps of a uniform layer's ``weight``."""
    codes = layer.integers().detach().cpu().numpy().reshape(weight.shape)
    step = layer.step.detach().float().cpu().clamp_min(STEP_MIN).numpy()
    bits = layer.quantizer.bits
    storage = _storage_bits(1 << bits)
    rebuilt = codes.astype(np.float32) * step.reshape(-1, *[1] * (weight.ndim - 1))
    if not _same(rebuilt.astype(np.float32), weight):
        raise RingqError(f"{name}: integer levels times steps do not give the hard weights")
    return {"name": name, "kind": "uniform", "codes": codes, "axis": 0, "levels": 1 << bits,
            "nominal_bits": bits, "form": "scale", "bits": storage, "signed": True,
            "scale": step.astype(np.float32), "levels_table": None}


# ---------------------------------------------------------------------------------------------
# The hard network as plain FP32 modules, exported by torch
# ---------------------------------------------------------------------------------------------

class ChannelAffine(nn.Module):
    """An inference BatchNorm as ``x * scale + shift`` per channel: the two terms PyTorch's
    CPU kernel computes from it (scale = weight / sqrt(running_var + eps), shift = bias -
    running_mean * scale), stored as 2 vectors instead of 4 (Mul + Add in the ONNX file)."""

    def __init__(self, norm):
        super().__init__()
        with torch.no_grad():
            scale = 1 / torch.sqrt(norm.running_var.float() + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight.float()
            shift = -norm.running_mean.float() * scale
            if norm.bias is not None:
                shift = shift + norm.bias.float()
        self.dims = 4 if isinstance(norm, nn.BatchNorm2d) else 2
        view = (-1, 1, 1) if self.dims == 4 else (-1,)
        self.register_buffer("scale", scale.reshape(view).clone())
        self.register_buffer("shift", shift.reshape(view).clone())

    def forward(self, x):
        if x.dim() != self.dims:
            raise RingqError(f"BatchNorm on a {x.dim()}-D input: not exportable as written")
        return x * self.scale + self.shift


def _affine_batchnorms(net):
    """Every BatchNorm1d / 2d with running statistics of ``net`` replaced by ChannelAffine."""
    for name, module in list(net.named_modules()):
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) \
                and module.running_var is not None:
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, ChannelAffine(module))


def hard_network(model):
    """(plain FP32 copy of ``model``'s hard network in eval mode, on the CPU, quantized layer
    plans, note or None). ``model`` itself is left as it is."""
    net = copy.deepcopy(model).cpu().eval()
    modes = {layer.quantizer.mode for _, layer in quantized_layers(net)}
    note = None
    if modes - {"hard"}:
        note = (f"the model was in {'/'.join(sorted(modes))} mode; its hard (k-bit) network was "
                f"exported, which is what a k-bit deployment computes (soft-mode accuracy does "
                f"not carry over)")
    if not modes:
        note = "no quantized layers: every weight is stored in FP32"
    set_weight_mode(net, "hard")
    plans = []
    for name, layer in quantized_layers(net):
        weight = _hard_weight(layer)
        if isinstance(layer, RING_LAYERS):
            plan = _ring_plan(name, layer, weight)
        elif isinstance(layer, UNIFORM_LAYERS):
            plan = _uniform_plan(name, layer, weight)
        else:
            raise RingqError(f"{name}: no ONNX form for {type(layer).__name__}")
        if plan is None:
            note = ((note + "; ") if note else "") + f"{name} kept FP32 (over 256 levels)"
        else:
            plans.append({**plan, "weight": weight})
        if not isinstance(layer, (QuantizedConv2d, QuantizedLinear)):
            raise RingqError(f"{name}: {type(layer).__name__} is neither conv nor linear")
        # a linear gets a zero bias where it has none: it makes the exporter write
        # Gemm(transB=1) on the weights as they are; a bias-free linear becomes MatMul on the
        # transposed weights, which onnxruntime fuses with an int4 DequantizeLinear into
        # MatMulNBits, which computes with int8-quantized activations (not the k-bit network).
        # An output scale follows as Mul + Add.
        plain = layer.plain_twin(torch.from_numpy(weight),
                                 zero_bias=isinstance(layer, QuantizedLinear))
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, attr, plain)
    _affine_batchnorms(net)
    return net.eval(), plans, note


def _torch_export(net, input_shape):
    """ModelProto of ``net`` at opset :data:`OPSET` / its IR, batch dimension dynamic."""
    onnx = _onnx()
    from onnx import version_converter
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy-exporter and constant-folding notices
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(input_shape), buffer, dynamo=False,
                          opset_version=TORCH_OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}},
                          training=torch.onnx.TrainingMode.PRESERVE,  # eval net: no Conv+BN fusion
                          do_constant_folding=True)
    proto = version_converter.convert_version(onnx.load_from_string(buffer.getvalue()), OPSET)
    proto.ir_version = ir_version_for(OPSET)
    _compact(proto.graph)
    _drop_default_attributes(proto.graph)
    return proto


def _compact(graph):
    """Drop what a runtime does not need, in place: Identity nodes (the exporter's shared
    copies of equal initializers, e.g. untrained BatchNorms), value_info (inferred again on
    load) and node names; the exporter's long intermediate names become t0, t1, ..."""
    outputs = {o.name for o in graph.output}
    alias = {}
    nodes = []
    for node in graph.node:
        inputs = [alias.get(i, i) for i in node.input]
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = inputs[0]
            continue
        del node.input[:]
        node.input.extend(inputs)
        nodes.append(node)
    keep = {i.name for i in graph.input} | outputs | {t.name for t in graph.initializer}
    names = {}
    for node in nodes:
        node.name = ""
        for name in node.output:
            if name and name not in keep:
                names.setdefault(name, f"t{len(names)}")
    for node in nodes:
        for field in (node.input, node.output):
            renamed = [names.get(n, n) for n in field]
            del field[:]
            field.extend(renamed)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


# ---------------------------------------------------------------------------------------------
# Replacing FP32 weights by packed low-bit ones
# ---------------------------------------------------------------------------------------------

def _packed(codes, bits, signed):
    import ml_dtypes
    if bits == 8:
        kind = np.int8 if signed else np.uint8
    else:
        kind = getattr(ml_dtypes, f"{'' if signed else 'u'}int{bits}")
    return codes.astype(kind)


def _find_initializer(graph, plan, taken):
    """(initializer, transposed) holding ``plan``'s weights (a MatMul may hold them
    transposed); one already replaced (``taken``) only when no other matches (the exporter
    stores equal tensors once)."""
    from onnx import numpy_helper
    weight = plan["weight"]
    named = [t for t in graph.initializer if t.name == f"{plan['name']}.weight"]
    others = [t for t in graph.initializer if t.name != f"{plan['name']}.weight"]
    ordered = [t for t in named + others if t.name not in taken] + \
        [t for t in named + others if t.name in taken]
    for tensor in ordered:
        if tensor.data_type != 1:  # FLOAT
            continue
        if tuple(tensor.dims) == weight.shape:
            if _same(numpy_helper.to_array(tensor), weight):
                return tensor, False
        elif weight.ndim == 2 and tuple(tensor.dims) == weight.shape[::-1]:
            if _same(numpy_helper.to_array(tensor), weight.T):
                return tensor, True
    raise RingqError(f"{plan['name']}: its weights are not an initializer of the exported graph")


class _Parameters:
    """Quantization parameters (scales, offsets, level tables) as initializers, one per value:
    the ring layers of a model share one ring, so their scale and offset are stored once
    (``ring0.scale``...); per-channel steps are the layer's own (``<weight>.scale``)."""

    def __init__(self):
        self.tensors, self.by_value = [], {}

    def add(self, array, name, shared):
        from onnx import numpy_helper
        array = np.ascontiguousarray(array, np.float32)
        key = (name.rpartition(".")[2], array.shape, array.tobytes())
        if shared and key in self.by_value:
            return self.by_value[key]
        if shared:
            name = f"ring{sum(k[0] == key[0] for k in self.by_value)}.{key[0]}"
            self.by_value[key] = name
        self.tensors.append(numpy_helper.from_array(array, name))
        return name


def _dequantize_nodes(plan, target, transposed, params):
    """(packed initializer, parameter names, nodes) that compute the tensor ``target``
    from ``plan``'s packed codes; parameters go to ``params``."""
    from onnx import helper, numpy_helper, TensorProto
    codes = plan["codes"].T if transposed else plan["codes"]
    packed = numpy_helper.from_array(_packed(codes, plan["bits"], plan["signed"]), f"{target}.q")
    shared = plan["axis"] is None  # a per-layer scalar (ring): the same for every layer
    attrs = {}
    if plan["axis"] is not None:
        attrs["axis"] = 1 - plan["axis"] if transposed else plan["axis"]
    scale = np.float32(1.0) if plan["form"] == "table" else plan["scale"]
    names = [params.add(scale, f"{target}.scale", shared)]
    dequantized = target if plan["form"] == "scale" else f"{target}.dq"
    nodes = [helper.make_node("DequantizeLinear", [packed.name, names[0]], [dequantized],
                              **attrs)]
    if plan["form"] == "scale+offset":
        names.append(params.add(plan["offset"], f"{target}.offset", shared))
        nodes.append(helper.make_node("Add", [dequantized, names[1]], [target]))
    elif plan["form"] == "table":
        names.append(params.add(plan["levels_table"], f"{target}.levels", shared))
        nodes += [helper.make_node("Cast", [dequantized], [f"{target}.index"],
                                   to=TensorProto.INT64),
                  helper.make_node("Gather", [names[1], f"{target}.index"], [target], axis=0)]
    return packed, names, nodes


def _drop_default_attributes(graph):
    """Conv's dilations of 1 and group 1 are the defaults: not written."""
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        keep = [a for a in node.attribute
                if not (a.name == "dilations" and all(v == 1 for v in a.ints))
                and not (a.name == "group" and a.i == 1)]
        del node.attribute[:]
        node.attribute.extend(keep)


def _quantize_graph(proto, plans):
    """Replace each plan's FP32 initializer in ``proto`` (in place); per-layer report rows."""
    graph = proto.graph
    params = _Parameters()
    taken, packed, new_nodes, rows = {}, [], [], []
    for plan in plans:
        tensor, transposed = _find_initializer(graph, plan, taken)
        row = {"name": plan["name"], "kind": plan["kind"], "shape": list(plan["weight"].shape),
               "weights": int(plan["codes"].size), "levels": plan["levels"],
               "nominal_bits": plan["nominal_bits"]}
        if tensor.name in taken:  # equal weights of two layers, stored once by the exporter
            first = taken[tensor.name]
            rows.append({**first, **row, "packed_bytes": 0, "shared_with": first["name"]})
            continue
        q, names, nodes = _dequantize_nodes(plan, tensor.name, transposed, params)
        packed.append(q)
        new_nodes += nodes
        row.update(bits=plan["bits"], onnx_type=q.data_type, form=plan["form"],
                   packed_bytes=len(q.raw_data), initializer=q.name, parameters=names)
        rows.append(row)
        taken[tensor.name] = row
    kept = [t for t in graph.initializer if t.name not in taken]
    del graph.initializer[:]
    graph.initializer.extend(kept + packed + params.tensors)
    inputs = [i for i in graph.input if i.name not in taken]  # initializers listed as inputs
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # the weights' nodes read initializers only
    return rows


def _report_bytes(proto, rows, file_bytes):
    """Serialized bytes of the file's initializers by kind; the rest is graph and metadata."""
    packed = {r["initializer"] for r in rows}
    params = {n for r in rows for n in r["parameters"]}
    kinds = {"packed_lowbit_initializers": 0, "quantization_parameters": 0,
             "fp32_initializers": 0, "other_initializers": 0}
    for t in proto.graph.initializer:
        kind = ("packed_lowbit_initializers" if t.name in packed else
                "quantization_parameters" if t.name in params else
                "fp32_initializers" if t.data_type == 1 else "other_initializers")
        kinds[kind] += t.ByteSize()
    kinds["graph_and_other"] = file_bytes - sum(kinds.values())
    return kinds


def _metadata(dataset, num_classes, input_shape, extra):
    mean, std = NORMALIZATION[dataset]
    props = {FORMAT_KEY: FORMAT, "ringq.dataset": dataset,
             "ringq.normalization_mean": json.dumps(list(mean)),
             "ringq.normalization_std": json.dumps(list(std)),
             "ringq.num_classes": str(num_classes),
             "ringq.input": json.dumps({"name": INPUT_NAME, "dtype": "float32",
                                        "shape": [BATCH_DIM, *input_shape[1:]],
                                        "layout": "NCHW",
                                        "preprocess": "(uint8 / 255 - mean) / std per channel"}),
             "ringq.output": OUTPUT_NAME, "ringq.weight_mode": "hard"}
    props.update({f"ringq.{k}": v if isinstance(v, str) else json.dumps(v)
                  for k, v in (extra or {}).items()})
    return props


def _default_dataset(channels):
    if channels == 3:
        return "cifar10"
    fits = [d for d in NORMALIZATION if len(NORMALIZATION[d][0]) == channels]
    raise RingqError(f"a {channels}-channel model: pass dataset= (one of {', '.join(fits)}) "
                     f"so that the file records its normalisation")


def export_onnx(model, path, input_shape=(1, 3, 32, 32), dataset=None, metadata=None,
                fp32_path=None):
    """Write ``model``'s hard network to ``path`` as one ONNX file; returns the size report.

    input_shape: one example [1, C, H, W] (the batch dimension is dynamic in the file);
    dataset: whose normalisation the file records (default cifar10 for 3 channels);
    metadata: more {key: value} recorded as ``ringq.<key>`` (values JSON unless str);
    fp32_path: also write the FP32 export of the same network there (else it is only
    measured: its serialized bytes). The report: ``file_bytes``, ``bytes_by_kind``, ``layers``
    (per quantized layer: ONNX type, storage bits, levels, form, packed bytes),
    ``bits_per_layer``, ``fp32_onnx_bytes``, ``ratio`` (FP32 / this), the opset, IR
    and exporter, and ``note`` when the model was not in hard mode.
    """
    onnx = _onnx()
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 4 or min(input_shape) < 1:
        raise RingqError(f"input_shape must be [N, C, H, W] (an image batch), got "
                         f"{list(input_shape)}")
    dataset = dataset or _default_dataset(input_shape[1])
    if dataset not in NORMALIZATION:
        raise RingqError(f"unknown dataset {dataset!r}; choose from {', '.join(NORMALIZATION)}")
    if len(NORMALIZATION[dataset][0]) != input_shape[1]:
        raise RingqError(f"{dataset} images have {len(NORMALIZATION[dataset][0])} channel(s), "
                         f"input_shape has {input_shape[1]}")
    net, plans, note = hard_network(model)
    with torch.no_grad():
        num_classes = int(net(torch.zeros(input_shape)).shape[1])
    proto = _torch_export(net, input_shape)
    fp32_bytes = proto.SerializeToString()
    if fp32_path is not None:
        write_atomic(fp32_path, lambda f: f.write(fp32_bytes))
    rows = _quantize_graph(proto, plans)
    proto.producer_name, proto.producer_version = PRODUCER, FORMAT
    proto.doc_string = ("k-bit network written by ringq (Ring Quantization): packed low-bit "
                        "weights dequantized exactly; input float32 NCHW normalised as recorded "
                        "in metadata_props")
    onnx.helper.set_model_props(proto, _metadata(dataset, num_classes, input_shape, metadata))
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    write_atomic(path, lambda f: f.write(data))
    type_names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    for row in rows:
        row["onnx_type"] = type_names.get(row["onnx_type"], str(row["onnx_type"]))
    report = {"output": str(path), "file_bytes": len(data),
              "bytes_by_kind": _report_bytes(proto, rows, len(data)),
              "layers": rows, "bits_per_layer": {r["name"]: r["bits"] for r in rows},
              "quantized_weights": sum(r["weights"] for r in rows),
              "fp32_onnx_bytes": len(fp32_bytes), "ratio": len(fp32_bytes) / len(data),
              "opset": OPSET, "ir_version": proto.ir_version, "exporter": EXPORTER,
              "dataset": dataset, "num_classes": num_classes,
              "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, *input_shape[1:]]}}
    if note:
        report["note"] = note
    return report


def checkpoint_input(config, meta=None, dataset=None):
    """(input_shape [1, C, H, W], dataset) of a model config, as evaluate.py picks the dataset."""
    name = config["model"]
    if name in CIFAR_MODELS:
        channels, side = config.get("in_channels", 3), 32
    else:
        channels, side = config.get("in_channels", 1), config.get("image_size", 28)
    dataset = dataset or (meta or {}).get("dataset") or (
        "cifar10" if name in CIFAR_MODELS else "fashion-mnist")
    return (1, channels, side, side), dataset


def export_checkpoint_onnx(checkpoint, path, dataset=None, fp32_path=None):
    """:func:`export_onnx` of any checkpoint ``load_model_from_checkpoint`` reads."""
    from .checkpoint import load_model_from_checkpoint
    model, config, meta = load_model_from_checkpoint(checkpoint)
    shape, dataset = checkpoint_input(config, meta, dataset)
    extra = {"model_config": config, "source_file": Path(checkpoint).name}
    report = export_onnx(model, path, shape, dataset, metadata=extra, fp32_path=fp32_path)
    return {"checkpoint": str(checkpoint), **report}


# ---------------------------------------------------------------------------------------------
# Reading and running the files
# ---------------------------------------------------------------------------------------------

def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_onnx_file(path):
    """The facts of an ONNX file this repository wrote; CheckpointError (one line) otherwise.

    Refused: a missing / unreadable file, one another tool wrote (no producer ``ringq``
    and ``ringq.format`` metadata), external data, and one whose input is not a 4-D
    float image batch [N, C, H, W] matching the recorded normalisation. Returns
    {"input", "output", "channels", "height", "width", "mean", "std", "num_classes",
    "dataset", "metadata"}.
    """
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else
                              f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError and friends: not an ONNX protobuf
        raise CheckpointError(f"{path}: not a readable ONNX file ({_first_line(e)})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if proto.producer_name != PRODUCER or props.get(FORMAT_KEY) != FORMAT:
        found = proto.producer_name or "no producer"
        raise CheckpointError(f"{path}: refused: not an ONNX file written by ringq ({found!r}, "
                              f"no {FORMAT_KEY} = {FORMAT} metadata)")
    graph = proto.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise CheckpointError(f"{path}: refused: weights stored outside the file")
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise CheckpointError(f"{path}: refused: {len(inputs)} inputs and {len(graph.output)} "
                              f"outputs; a ringq classifier has one image input and one output")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 \
            or not all(d and d > 0 for d in dims[1:]):
        shape = "x".join("N" if d is None else str(d) for d in dims) or "no shape"
        raise CheckpointError(f"{path}: refused: input {inputs[0].name!r} is "
                              f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {shape}, not a "
                              f"float32 image batch N x C x H x W")
    try:
        mean = [float(v) for v in json.loads(props["ringq.normalization_mean"])]
        std = [float(v) for v in json.loads(props["ringq.normalization_std"])]
        num_classes = int(props["ringq.num_classes"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: refused: normalisation / class count metadata missing "
                              f"or malformed ({_first_line(e)})") from None
    if len(mean) != dims[1] or len(std) != dims[1] or min(std) <= 0 or num_classes < 1:
        raise CheckpointError(f"{path}: refused: normalisation for {len(mean)} channel(s) "
                              f"does not fit the {dims[1]}-channel input")
    return {"input": inputs[0].name, "output": graph.output[0].name, "channels": dims[1],
            "height": dims[2], "width": dims[3], "mean": mean, "std": std,
            "num_classes": num_classes, "dataset": props.get("ringq.dataset"),
            "metadata": props, "opset": max((o.version for o in proto.opset_import
                                             if o.domain in ("", "ai.onnx")), default=None)}


class OnnxClassifier:
    """An onnxruntime session (CPU) on a checked ringq ONNX file.

    ``threads``: intra-op threads (None: onnxruntime's default); ``start_s`` is the
    session's creation time in seconds.
    """

    def __init__(self, path, threads=None):
        ort = _ort()
        self.path = Path(path)
        self.info = check_onnx_file(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:
            hint = ""
            if tuple(int(v) for v in ort.__version__.split(".")[:2] if v.isdigit()) < (1, 24):
                hint = f"; int2 weights need onnxruntime >= 1.24, this is {ort.__version__}"
            raise CheckpointError(f"{path}: onnxruntime cannot load it "
                                  f"({_first_line(e)}{hint})") from None
        self.start_s = time.perf_counter() - start
        info = self.info
        self.mean = np.asarray(info["mean"], np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(info["std"], np.float32).reshape(1, -1, 1, 1)

    def normalize(self, images):
        """float32 (uint8 / 255 - mean) / std, as ``ringq.data.normalize`` computes it."""
        x = np.asarray(images).astype(np.float32) / np.float32(255)
        return (x - self.mean) / self.std

    def _check(self, x):
        want = (self.info["channels"], self.info["height"], self.info["width"])
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise DataError(f"images are {list(x.shape)}; {self.path.name} takes "
                            f"N x {' x '.join(map(str, want))}")

    def logits(self, images):
        """Logits float32 [N, classes] of ``images``: float (already normalised) or uint8
        (normalised here with the recorded mean / std); numpy or torch."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        x = np.asarray(images)
        self._check(x)
        x = self.normalize(x) if x.dtype == np.uint8 else np.ascontiguousarray(x, np.float32)
        return self.session.run([self.info["output"]], {self.info["input"]: x})[0]


def run_onnx(path, images, threads=None):
    """Logits (numpy float32 [N, classes]) of ``images`` through onnxruntime on the CPU.

    ``path``: a ringq ONNX file or an :class:`OnnxClassifier`; ``images``: float32
    normalised [N, C, H, W], or uint8 (then normalised with the file's recorded stats).
    """
    model = path if isinstance(path, OnnxClassifier) else OnnxClassifier(path, threads)
    return model.logits(images)


def evaluate_onnx(path, dataset, batch_size=256, limit=None, threads=None, return_logits=False):
    """Top-1 accuracy of the ONNX file on an ArrayDataset-like split (uint8 ``images``
    [n, C, H, W], ``labels`` [n]); batches of ``batch_size``, the first ``limit`` images.

    Returns {"accuracy" (percent), "correct", "total", "batch_size", "seconds"} and, with
    ``return_logits``, "logits" (numpy [n, classes]).
    """
    model = path if isinstance(path, OnnxClassifier) else OnnxClassifier(path, threads)
    images, labels = dataset.images, dataset.labels
    n = len(labels) if limit is None else min(int(limit), len(labels))
    labels = np.asarray(labels[:n].cpu() if isinstance(labels, torch.Tensor) else labels[:n])
    outputs, correct = [], 0
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        batch = images[i:min(i + batch_size, n)]
        if isinstance(batch, torch.Tensor):
            batch = batch.cpu().numpy()
        if np.asarray(batch).dtype != np.uint8:
            raise DataError(f"evaluate_onnx takes uint8 images, got {np.asarray(batch).dtype}")
        logits = model.logits(batch)
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
        if return_logits:
            outputs.append(logits)
    result = {"accuracy": 100.0 * correct / max(n, 1), "correct": correct, "total": n,
              "batch_size": batch_size, "seconds": time.perf_counter() - start}
    if return_logits:
        result["logits"] = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    return result


@torch.no_grad()
def torch_hard_logits(model, dataset, mean, std, batch_size=500):
    """Logits (numpy float32 [n, classes]) of ``model`` in hard mode on ``dataset``'s uint8
    images, normalised as the loaders do (mean, std: per-channel sequences)."""
    model = copy.deepcopy(model).cpu().eval()
    set_weight_mode(model, "hard")
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = torch.as_tensor(dataset.images)
    out = [model(data_normalize(images[i:i + batch_size], mean, std)).float()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def agreement(onnx_logits, reference_logits):
    """How an ONNX file's logits agree with a reference's [n, classes] on the same images:
    {"same_top1", "total", "disagreements" (the first 20 indices), "max_abs_logit_diff"}."""
    a, b = np.asarray(onnx_logits), np.asarray(reference_logits)
    if a.shape != b.shape:
        raise RingqError(f"the reference gives logits {list(b.shape)}, the ONNX file "
                         f"{list(a.shape)}: not the same network")
    differ = np.flatnonzero(a.argmax(1) != b.argmax(1))
    return {"same_top1": int(a.shape[0] - differ.size), "total": int(a.shape[0]),
            "disagreements": differ[:20].tolist(),
            "max_abs_logit_diff": float(np.abs(a - b).max()) if a.size else 0.0}
