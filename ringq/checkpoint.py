"""Checkpoint I/O: safe loading and the original authors' files (atomic saving: ``atomic``).

Every load goes through ``torch.load(..., weights_only=True)``: a file that
needs arbitrary pickled code is refused, never executed. Our checkpoints are
dicts ``{"format": "ringq", "config": {...}, "model": state_dict, ...}`` and
carry the full config, so ``evaluate.py --checkpoint FILE`` rebuilds the model
from the file alone. The original checkpoints (``{"model_state_dict": ...}``)
carry no config: it is inferred from the state dict. Every config read from a
file is checked before a model is built (:mod:`ringq.trust`).

The best accuracy a file records is reported labelled (``recorded_best``): its
split, epoch, weight mode, and whose figure it is, ``this run`` for a training
checkpoint, ``source checkpoint`` for a file derived from one (packed, quantized
after training, model-only). Derived files record their source by file name
only, never by path.
"""
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from models import DEPTHS, build_model
from models.ring_math import RING_LAYOUTS, RING_TYPES, ring_values
from models.uniform_layers import PTQ_SCALES

from .atomic import save_atomic
from .config import DATASETS
from .errors import CheckpointError
from .packing import is_packed_file, load_packed
from .trust import check_model_config, check_shapes, meta_model

FORMAT = "ringq"
MODEL_ONLY_KEYS = ("format", "version", "config", "model_config", "model", "epoch", "best",
                   "sigma")  # what evaluating or warm-starting from a training checkpoint reads
PICKLE_PROTO = 0x80  # first byte of a pickle stream (protocol 2+)
PATH_KEYS = ("data_dir", "init_from", "distill_from")  # run-config entries that may hold a path
OF_THIS_RUN, OF_SOURCE = "this run", "source checkpoint"  # whose recorded best a file holds
BEST_KEYS = ("accuracy", "split", "epoch", "mode")
SPLITS = ("val", "test")
MODES = ("soft", "hard", "fp32")


def _check_archive(path):
    """CheckpointError when ``path`` is a zip archive (torch's format) with a corrupt member."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        return  # not a zip (legacy format, or garbage): torch.load says what it is
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint (checksum mismatch in {bad})")


def _refusal(path, error):
    """The CheckpointError for a pickle that the weights-only unpickler rejected."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        return CheckpointError(f"{path}: refused: loading it would call {found.group(1)}, "
                               f"which could run code; it was not loaded (checkpoints must "
                               f"hold tensors and plain data only)")
    with open(path, "rb") as f:
        raw_pickle = f.read(1)[0] == PICKLE_PROTO
    if raw_pickle:
        return CheckpointError(f"{path}: refused: a raw pickle stream, not a torch checkpoint; "
                               f"it was not unpickled, since that could run code")
    return CheckpointError(f"{path}: not a readable checkpoint (corrupt or not a torch file)")


def safe_load(path, map_location="cpu"):
    """Load a torch file with ``weights_only=True``; every failure is a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    try:
        _check_archive(path)
        with warnings.catch_warnings():  # e.g. the pickle-protocol notice: not ours to print
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError,
            IndexError, TypeError, AttributeError) as e:
        first = (str(e).splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{type(e).__name__}: {first[:120]})") from None


def _identify_ring(template):
    """(ring_type, layout) whose values equal ``template``; CheckpointError if none."""
    n = template.numel()
    for layout in RING_LAYOUTS:
        for ring_type in RING_TYPES:
            if torch.allclose(template.float().cpu(), ring_values(n, ring_type, layout), atol=1e-5):
                return ring_type, layout
    raise CheckpointError(f"unrecognised ring_template {template.tolist()}")


def infer_config(state_dict):
    """Model config of a CIFAR ResNet state dict that carries none (the original files).

    Depth from the number of blocks in ``layer1``, ring size and type from
    ``conv1.ring_template``, classes from ``linear.weight``.
    """
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"layer1\.(\d+)\.", k))}
    depth = {n: name for name, n in DEPTHS.items()}.get(len(blocks))
    if "linear.weight" not in state_dict or depth is None:
        raise CheckpointError("state dict is not a CIFAR ResNet-20/32/44/56 (expected keys "
                              "conv1.*, layer1.N.*, ..., linear.weight)")
    num_classes, width = state_dict["linear.weight"].shape
    if "conv1.ring_template" in state_dict:
        template = state_dict["conv1.ring_template"]
        ring_type, layout = _identify_ring(template)
        return {"model": depth, "quantization": "ring", "ring_size": template.numel(),
                "ring_type": ring_type, "ring_layout": layout, "interpolation": "gaussian",
                "sigma": None, "num_classes": int(num_classes)}
    if "conv1.weight" in state_dict:
        return {"model": depth, "quantization": "none", "num_classes": int(num_classes)}
    raise CheckpointError("state dict has neither conv1.ring_template nor conv1.weight")


def load_state(model, state_dict, source):
    """load_state_dict(strict) with a one-line error naming what does not fit."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{source}: weights do not fit the model "
                              f"({detail[:200]})") from None


def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _epoch(value):
    """``value`` when it is an epoch number (int >= 0), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def recorded_best(best, of):
    """A recorded best figure, labelled: {accuracy, split, epoch, mode, of}, or None.

    best: a checkpoint's ``best`` ({epoch, accuracy, mode, split}; older files may
    lack keys) or a packed file's ``source.best``; it is untrusted, so a field of
    the wrong kind reads as not recorded (None), and no figure at all (or the -1
    a run holds before its first epoch) gives None. of: whose figure it is,
    :data:`OF_THIS_RUN` or :data:`OF_SOURCE`. split: ``val`` or ``test``; mode:
    the weights it was measured with (soft, hard, fp32).
    """
    if not isinstance(best, dict) or not _finite_number(best.get("accuracy")) \
            or best["accuracy"] < 0:
        return None
    return {"accuracy": best["accuracy"],
            "split": best.get("split") if best.get("split") in SPLITS else None,
            "epoch": _epoch(best.get("epoch")),
            "mode": best.get("mode") if best.get("mode") in MODES else None, "of": of}


def _dataset(value):
    return value if value in DATASETS else None


def _file_name(value):
    return Path(value).name if isinstance(value, str) and value else None


def packed_meta(extra):
    """``meta`` of a packed file from its header ``extra`` (see :func:`source_extra`).

    Files written before the labelled schema hold ``best_accuracy`` (the source's
    best, split unknown), ``epoch`` and ``source_checkpoint`` (a path) instead of
    ``source``; both load.
    """
    source = extra.get("source")
    if isinstance(source, dict):
        best, epoch, file = source.get("best"), source.get("epoch"), source.get("file")
    else:
        best, epoch = {"accuracy": extra.get("best_accuracy")}, extra.get("epoch")
        file = extra.get("source_checkpoint")
    meta = {"source": "packed", "dataset": _dataset(extra.get("dataset")), "epoch": _epoch(epoch),
            "source_file": _file_name(file), "recorded_best": recorded_best(best, OF_SOURCE)}
    if _epoch(extra.get("ptq_bits")) and extra.get("ptq_scale") in PTQ_SCALES:
        meta["ptq"] = {"bits": extra["ptq_bits"], "scale": extra["ptq_scale"]}
    return meta


def source_extra(meta, path):
    """The packed-file ``extra`` of a model derived from the checkpoint at ``path`` (its ``meta``).

    {"dataset": ..., "source": {"file": the source's file name (no directory),
    "epoch": the epoch its weights are from, "best": its recorded best
    {accuracy, split, epoch, mode} or None}}: no path of this machine.
    """
    best = meta.get("recorded_best")
    return {"dataset": meta.get("dataset"),
            "source": {"file": Path(path).name, "epoch": meta.get("epoch"),
                       "best": None if best is None else {k: best[k] for k in BEST_KEYS}}}


def as_source(meta, path):
    """``meta`` of a model derived from the checkpoint at ``path`` (e.g. quantized after
    training): its recorded best becomes the source checkpoint's."""
    best = meta.get("recorded_best")
    return {**meta, "source_file": Path(path).name,
            "recorded_best": None if best is None else {**best, "of": OF_SOURCE}}


def _training_meta(ckpt):
    """``meta`` of a checkpoint written by the training scripts (or by :func:`model_only`)."""
    recorded = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    own_run = "optimizer" in ckpt  # a model-only file keeps the best of the run it came from
    source = ckpt.get("source") if isinstance(ckpt.get("source"), dict) else {}
    return {"source": "ringq", "epoch": _epoch(ckpt.get("epoch")),
            "dataset": _dataset(recorded.get("dataset")),
            "source_file": None if own_run else _file_name(source.get("file")),
            "recorded_best": recorded_best(ckpt.get("best"), OF_THIS_RUN if own_run
                                           else OF_SOURCE)}


def _weights(ckpt, path):
    """(model config, state dict, meta) of a non-packed checkpoint, unchecked."""
    if ckpt.get("format") == FORMAT:
        config, state = ckpt.get("model_config"), ckpt.get("model")
        if isinstance(config, dict) and isinstance(ckpt.get("sigma"), float):
            config = {**config, "sigma": ckpt["sigma"]}  # annealed runs end below the default
        return config, state, _training_meta(ckpt)
    state = ckpt.get("model_state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path}: no model state dict found (expected key "
                              f"'model_state_dict' or a dict of tensors)")
    try:
        config = infer_config(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    meta = {"source": "upstream" if "model_state_dict" in ckpt else "state_dict",
            "epoch": _epoch(ckpt.get("epoch")), "dataset": None, "source_file": None,
            "recorded_best": recorded_best({"accuracy": ckpt.get("best_accuracy")},
                                           OF_THIS_RUN)}
    return config, state, meta


def load_model_from_checkpoint(path, map_location="cpu"):
    """Rebuild a model from any checkpoint we can read: (model, config, meta).

    Accepts our training checkpoints, packed k-bit files (export.py), the
    original authors' files and bare state dicts. The file's model config is
    untrusted: it is checked, and the shapes it implies are matched against the
    stored tensors, before the model is built. ``meta``: ``source`` (packed,
    ringq, upstream or state_dict), ``dataset`` (or None), ``epoch`` (of the
    weights, or None), ``source_file`` (name of the checkpoint a derived file
    came from, or None), ``recorded_best`` (:func:`recorded_best`, or None)
    and, for a packed PTQ file, ``ptq`` {bits, scale}.
    """
    if Path(path).is_file() and is_packed_file(path):
        model, config, extra = load_packed(path, map_location=map_location)
        return model, config, packed_meta(extra)
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    config, state, meta = _weights(ckpt, path)
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint lacks its model config or weights")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: the model weights are not all tensors")
    config = check_model_config(config, f"{path}: model config")
    expected = {k: tuple(t.shape) for k, t in
                meta_model(config, f"{path}: model config").state_dict().items()}
    check_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, path)
    model = build_model(config)
    load_state(model, state, path)
    return model.to(map_location), config, meta


def portable_config(config):
    """A run config to ship: without the run's own folder (``output_dir``) and without
    absolute paths of this machine (a relative data_dir, init_from or distill_from stays;
    ``init_source`` / ``distill_source`` name the sources)."""
    return {k: v for k, v in config.items() if k != "output_dir" and not (
        k in PATH_KEYS and isinstance(v, str) and Path(v).is_absolute())}


def _training_checkpoint(path):
    """The dict of a checkpoint written by the training scripts; CheckpointError otherwise."""
    ckpt = safe_load(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and "model" in ckpt):
        raise CheckpointError(f"{path}: not a training checkpoint of this project (expected "
                              f"a last.pt or best.pt written by train_*.py)")
    return ckpt


def model_only(path):
    """A training checkpoint without its training state (optimizer, scheduler, history, RNG).

    What remains (``MODEL_ONLY_KEYS``, the config without machine paths:
    :func:`portable_config`) evaluates, warm-starts (``--init-from``) and
    fine-tunes like the full file, but cannot be resumed; ``source`` {"file":
    the source's file name} records where it came from, and its ``best`` reads
    as the source run's figure. CheckpointError for anything but a checkpoint
    written by the training scripts (a packed file included).
    """
    if Path(path).is_file() and is_packed_file(path):
        raise CheckpointError(f"{path}: a packed file (export.py output), not a training "
                              f"checkpoint; --model-only takes the last.pt or best.pt written by "
                              f"train_*.py")
    ckpt = _training_checkpoint(path)
    out = {k: ckpt[k] for k in MODEL_ONLY_KEYS if k in ckpt}
    if isinstance(out.get("config"), dict):
        out["config"] = portable_config(out["config"])
    return {**out, "source": {"file": Path(path).name}}


def rewrite_metadata(path, changes):
    """Replace top-level entries of the training checkpoint at ``path`` (atomically).

    changes: {key: new value} (None removes the key); the weights (``model``)
    cannot be changed, and are saved again as the same tensors, bit for bit.
    """
    if "model" in changes:
        raise ValueError("rewrite_metadata changes metadata only, not the weights ('model')")
    ckpt = _training_checkpoint(path)
    ckpt.update(changes)
    save_atomic({k: v for k, v in ckpt.items() if k not in changes or v is not None}, path)
