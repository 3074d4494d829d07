"""Model configs read from files are untrusted: checked before any model is built.

A packed file's header ``config`` and a training checkpoint's ``model_config``
decide how much memory ``build_model`` asks for, so a crafted value
(``num_classes: 2**40``) must be refused, in one line, before anything is
allocated. :func:`check_model_config` checks every key against the option
table (:data:`ringq.config.OPTION_BY_NAME`: type, choices, range) and bounds
the sizes the table does not hold; :func:`meta_model` then builds the model on
the meta device (shapes only, no memory), so the shapes a config implies can be
compared with the tensors a file really stores (:func:`check_shapes`) before
the real model is built.
"""
import math

import torch

from models import build_model

from .config import OPTION_BY_NAME
from .errors import CheckpointError

OPTION_KEYS = ("model", "quantization", "bits", "ring_size", "ring_type", "ring_layout",
               "interpolation", "sigma", "fp32_first_layer")
# build_model keys the option table does not hold: inclusive (low, high)
SIZE_RANGES = {"num_classes": (1, 100_000), "in_channels": (1, 64), "image_size": (1, 4096)}
REQUIRED_KEYS = ("model", "quantization")
_SHOWN = 60  # characters of a rejected value quoted in an error


def _show(value):
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(option, value):
    """Why ``value`` does not have ``option``'s type (None when it has)."""
    if option.type is float:
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
        return None if ok else f"must be a finite number, got {_show(value)}"
    ok = _is_int(value) if option.type is int else isinstance(value, option.type)
    return None if ok else f"must be {option.type.__name__}, got {_show(value)}"


def option_problem(key, value):
    """Why ``value`` is not a valid ``key`` of a model config (None when it is)."""
    if key in SIZE_RANGES:
        low, high = SIZE_RANGES[key]
        return None if _is_int(value) and low <= value <= high else \
            f"must be an integer in {low}..{high}, got {_show(value)}"
    option = OPTION_BY_NAME[key]
    if value is None:
        return None if option.default is None else "must be set, got None"
    problem = _type_problem(option, value)
    if problem is None and option.choices and value not in option.choices:
        problem = f"invalid value {_show(value)}; choose from {', '.join(option.choices)}"
    if problem is None and option.check:
        problem = option.check(value)
        problem = problem and f"{problem}, got {_show(value)}"
    return problem


def check_model_config(config, where):
    """``config`` (a ``build_model`` mapping read from a file) after checking every key.

    where: what the config is, for the message (e.g. ``"f.rqp: config"``). Raises
    a one-line :class:`CheckpointError` for a non-mapping, an unknown or missing
    key, a value of the wrong type, outside its choices or range, or a ring
    (uniform) model without ``ring_size`` (``bits``).
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is not a mapping (got {type(config).__name__})")
    for key, value in config.items():
        if key not in OPTION_KEYS and key not in SIZE_RANGES:
            raise CheckpointError(f"{where}: unknown key {_show(key)}")
        problem = option_problem(key, value)
        if problem:
            raise CheckpointError(f"{where}: {key}: {problem}")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    needs = {"ring": "ring_size", "uniform": "bits"}.get(config.get("quantization"))
    if needs and config.get(needs) is None:
        missing.append(needs)
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)} (a "
                              f"{config.get('quantization', 'model')} model needs it)")
    return config


def meta_model(config, where):
    """``build_model(config)`` on the meta device: every tensor's shape, no memory allocated.

    config: checked by :func:`check_model_config` first. CheckpointError when it
    cannot build a model.
    """
    try:
        with torch.device("meta"):
            return build_model(config)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{where} cannot build a model ({type(e).__name__}: {first})") \
            from None


def check_shapes(expected, stored, where):
    """CheckpointError ``"<where>: weights do not fit the model (...)"`` unless the stored
    tensors have exactly the expected names and shapes.

    expected, stored: {state-dict key: shape (tuple of ints)}.
    """
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    wrong = [k for k in expected if k in stored and tuple(stored[k]) != tuple(expected[k])]
    if missing or unexpected:
        detail = "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected))
                           if keys)
    elif wrong:
        key = wrong[0]
        detail = (f"{key}: stored shape {list(stored[key])}, the config implies "
                  f"{list(expected[key])}")
    else:
        return
    raise CheckpointError(f"{where}: weights do not fit the model ({detail})")
