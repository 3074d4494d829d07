"""What a run trains, as a fingerprint, and the code it ran: the identity of a run.

Two runs whose *recipe* (every option that changes what is trained, less the seed
and the validation split's seed) is the same are seeds of one table row; two runs
whose *run* identity (the recipe plus ``seed`` and ``val_seed``) is the same are the
same run. Left out of both: the device, the paths, the verbosity and the loader's
worker count (``NOT_IDENTITY``). ``--init-from`` enters as ``init_source`` and
``--distill-from`` as ``distill_source``: the identity of the source checkpoint (its
own run fingerprint and epoch, or the sha256 of its weights for a file without a
recorded config), never its path.

An option at its default is left out of the fingerprint, so options added later
(with a default that changes nothing) leave earlier fingerprints as they were.
Fingerprints are recomputed from recorded configs by the code that reads them.
"""
import hashlib
import json
import subprocess
from pathlib import Path

import torch

from . import config as config_lib
from .errors import CheckpointError

NOT_IDENTITY = ("device", "data_dir", "output_dir", "quiet", "workers", "download", "init_from",
                "distill_from")
PER_RUN = ("seed", "val_seed")  # in the run identity, not in the recipe
ROOT = Path(__file__).resolve().parents[1]


def identity_options(cfg, per_run=True):
    """{option: value} of ``cfg`` that define what it trains (defaults left out), with
    ``init_source`` when the run starts from another checkpoint."""
    out = {}
    for o in config_lib.OPTIONS:
        if o.name in NOT_IDENTITY or (o.name in PER_RUN and not per_run):
            continue
        value = cfg.get(o.name, o.default)
        if value != o.default:
            out[o.name] = value
    for key, flag in (("init_source", "init_from"), ("distill_source", "distill_from")):
        if cfg.get(key) is not None:
            out[key] = same_source(cfg[key])
        elif cfg.get(flag):  # a record written before sources were fingerprinted
            out[key] = {"path": Path(cfg[flag]).name}
    return out


def same_source(source):
    """A source identity without the file's name, which is not part of it."""
    return {k: v for k, v in source.items() if k != "file"}


def _digest(options):
    text = json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_fingerprint(cfg):
    """16 hex digits naming the recipe of ``cfg`` (seeds left out): one table row."""
    return _digest(identity_options(cfg, per_run=False))


def run_fingerprint(cfg):
    """16 hex digits naming the run of ``cfg`` (the recipe, its seed and its split)."""
    return _digest(identity_options(cfg))


def fingerprints(cfg):
    return {"recipe": recipe_fingerprint(cfg), "run": run_fingerprint(cfg)}


def differences(recorded, requested, per_run=True):
    """``option recorded -> requested`` for every identity option where two configs differ
    (empty string when none)."""
    a, b = identity_options(recorded, per_run), identity_options(requested, per_run)
    defaults = {o.name: o.default for o in config_lib.OPTIONS}
    return ", ".join(f"{k} {a.get(k, defaults.get(k))!r} -> {b.get(k, defaults.get(k))!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def split_of(cfg):
    """(dataset, val_split, val_seed) of a config: which images it held out (val_seed None
    when nothing was held out)."""
    return (cfg.get("dataset"), cfg.get("val_split", 0),
            cfg.get("val_seed") if cfg.get("val_split") else None)


def describe_split(split):
    dataset, size, seed = split
    return f"{dataset}, no validation split" if not size else \
        f"{dataset}, {size}-image validation split of val_seed {seed}"


def checkpoint_source(ckpt):
    """The identity of a loaded checkpoint as a source (``init_source``, teacher):
    {fingerprint, epoch, split} from its recorded config, or {sha256} of its weights."""
    recorded = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(recorded, dict):
        cfg = config_lib.with_recorded_split(recorded)
        return {"fingerprint": run_fingerprint(cfg), "epoch": ckpt.get("epoch"),
                "split": list(split_of(cfg))}
    state = ckpt.get("model_state_dict", ckpt) if isinstance(ckpt, dict) else {}
    digest = hashlib.sha256()
    for key in sorted(state):
        if torch.is_tensor(state[key]):
            digest.update(key.encode())
            digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return {"sha256": digest.hexdigest()[:16]}


def git_state(root=ROOT):
    """{commit, dirty} of the code in ``root`` (dirty: tracked files changed), or None
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def load_source(path, cfg, role):
    """(checkpoint dict, identity) of the checkpoint a run starts from or learns from.

    role names the flag (``--init-from``). CheckpointError (one line) for a packed file,
    or when the run holds out validation images and the source's recorded split is
    another one or unknown: a source trained on the run's validation images would make
    its selection look better than it is.
    """
    from .checkpoint import safe_load
    from .packing import is_packed_file
    if Path(path).is_file() and is_packed_file(path):
        raise CheckpointError(f"{path}: a packed file holds a quantized model; {role} needs "
                              f"the last.pt or best.pt of a --quantization none run")
    ckpt = safe_load(path)
    source = {"file": Path(path).name, **checkpoint_source(ckpt)}
    split = split_of(cfg)
    if split[1] and ("split" not in source or tuple(source["split"]) != split):
        found = describe_split(tuple(source["split"])) if "split" in source else \
            "no recorded split"
        raise CheckpointError(
            f"{path}: trained with {found}, this run holds out a {describe_split(split)}; "
            f"{role} needs a source trained on the same split (or pass --val-seed to match)")
    return ckpt, source
