"""Checkpoint I/O: safe loading and the original authors' files (atomic saving: ``atomic``).

Every load goes through ``torch.load(..., weights_only=True)``: a file that
needs arbitrary pickled code is refused, never executed. Our checkpoints are
dicts ``{"format": "ringq", "config": {...}, "model": state_dict, ...}`` and
carry the full config, so ``evaluate.py --checkpoint FILE`` rebuilds the model
from the file alone. The original checkpoints (``{"model_state_dict": ...}``)
carry no config: it is inferred from the state dict.
"""
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from models import DEPTHS, build_model
from models.ring_math import RING_LAYOUTS, RING_TYPES, ring_values

from .errors import CheckpointError
from .packing import is_packed_file, load_packed

FORMAT = "ringq"
MODEL_ONLY_KEYS = ("format", "version", "config", "model_config", "model", "epoch", "best",
                   "sigma")  # what evaluating or warm-starting from a training checkpoint reads
PICKLE_PROTO = 0x80  # first byte of a pickle stream (protocol 2+)


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


def load_model_from_checkpoint(path, map_location="cpu"):
    """Rebuild a model from any checkpoint we can read: (model, config, meta).

    Accepts our training checkpoints, packed k-bit files (export.py), the
    original authors' files and bare state dicts. ``meta`` holds ``source``
    and, when recorded, ``best_accuracy`` and ``epoch``.
    """
    if Path(path).is_file() and is_packed_file(path):
        model, config, extra = load_packed(path, map_location=map_location)
        return model, config, {**(extra or {}), "source": "packed"}
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    meta = {}
    if ckpt.get("format") == FORMAT:
        config, state = ckpt.get("model_config"), ckpt.get("model")
        if isinstance(config, dict) and isinstance(ckpt.get("sigma"), float):
            config = {**config, "sigma": ckpt["sigma"]}  # annealed runs end below the default
        recorded = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        meta.update(source="ringq", epoch=ckpt.get("epoch"), dataset=recorded.get("dataset"),
                    data_dir=recorded.get("data_dir"),
                    best_accuracy=(ckpt.get("best") or {}).get("accuracy"))
    else:
        state = ckpt.get("model_state_dict", ckpt)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise CheckpointError(f"{path}: no model state dict found (expected key "
                                  f"'model_state_dict' or a dict of tensors)")
        try:
            config = infer_config(state)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        meta.update(source="upstream" if "model_state_dict" in ckpt else "state_dict",
                    epoch=ckpt.get("epoch"), best_accuracy=ckpt.get("best_accuracy"))
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint lacks its model config or weights")
    try:
        model = build_model(config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from None
    load_state(model, state, path)
    return model.to(map_location), config, meta


def model_only(path):
    """A training checkpoint without its training state (optimizer, scheduler, history, RNG).

    What remains (``MODEL_ONLY_KEYS``) evaluates, warm-starts (``--init-from``) and
    fine-tunes like the full file, but cannot be resumed. CheckpointError for anything
    but a checkpoint written by the training scripts.
    """
    ckpt = safe_load(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and "model" in ckpt):
        raise CheckpointError(f"{path}: not a training checkpoint of this project (expected "
                              f"a last.pt or best.pt written by train_*.py)")
    return {k: ckpt[k] for k in MODEL_ONLY_KEYS if k in ckpt}
