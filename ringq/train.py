"""The training run behind ``train_cifar10.py`` and ``train_mnist.py``.

``main(task, argv)`` parses flags, resolves the config, checks every input
before touching the disk, then trains with per-epoch checkpoints
(``last.pt``, ``best.pt``), ``metrics.csv`` and a final ``final.json``.

Every file is replaced atomically, and ``last.pt`` (an epoch-0 one before the
first epoch) always holds the last completed epoch, so a run killed at any
moment loses at most that epoch; ``--resume DIR/last.pt`` then continues it
exactly. SIGINT/SIGTERM stop after the current step (exit 130), a non-finite
loss stops before the epoch is saved (exit 3); both say how to resume.
``final.json`` exists only once the run has finished.
"""
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from models import build_model
from models.convert import init_from_fp32
from models.utils import count_parameters, quant_summary, ring_summary

from . import config as config_lib
from . import data as data_lib
from . import identity
from .atomic import remove_stale_temps, save_atomic, write_text_atomic
from .checkpoint import FORMAT, load_model_from_checkpoint, load_state, portable_config, safe_load
from .distributed import cleanup, convert_batchnorm, init_distributed, local_rank_first, unwrap
from .engine import (Interrupted, NonFiniteError, StopSignals, apply_epoch_schedule,
                     evaluate_all_modes, lr_at, param_groups, sigma_at, train_mode_at,
                     train_one_epoch)
from .errors import CheckpointError, RingqError
from .precision import resolve_precision
from .report import report_dict
from .runtime import (ArgumentParser, determinism, library_versions, resolve_device, run_cli,
                      seed_everything)

TASK_TITLES = {"cifar10": "Train a ring-quantized (or FP32) ResNet on CIFAR-10.",
               "mnist": "Train a ring-quantized (or FP32) MLP or LeNet on MNIST / Fashion-MNIST."}
SCRIPTS = {"cifar10": "train_cifar10.py", "mnist": "train_mnist.py"}
# time_s is wall-clock: the one column that differs between identical runs
METRIC_FIELDS = ["epoch", "lr", "sigma", "weight_mode", "train_loss", "train_acc", "eval_split",
                 "eval_loss", "eval_acc", "eval_hard_loss", "eval_hard_acc", "skipped_steps",
                 "time_s"]
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.csv", "final.json")
RESUME_KEYS = ("config", "model_config", "model", "optimizer", "epoch", "history", "best", "rng")


class Resume(NamedTuple):
    """The checkpoint a run continues: its path and its contents."""
    path: Path
    checkpoint: dict


def get_args_parser(task):
    parser = ArgumentParser(
        description=TASK_TITLES[task],
        epilog="Every option can also be set in a YAML file given with --config "
               "(keys as the flags, with underscores); flags override the file.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue the run saved in CHECKPOINT (its last.pt); its recorded "
                             "config is the base that --config and flags override")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in an existing, non-empty output directory")
    config_lib.add_options(parser, task)
    return parser


def _own_run(out, resume):
    """True when ``resume`` continues the run stored in ``out``."""
    return resume is not None and resume.path.resolve().parent == out.resolve()


def _check_output_dir(out, resume, overwrite):
    """Refuse an output directory that cannot be written or that holds another run."""
    if out.exists() and not out.is_dir():
        raise RingqError(f"output directory {out} exists and is not a directory")
    ancestor = next(p for p in (out, *out.parents) if p.exists())
    if not ancestor.is_dir():
        raise RingqError(f"cannot create output directory {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RingqError(f"output directory {out} is not writable")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or _own_run(out, resume)):
        hint = f"--resume {out / 'last.pt'} to continue it, or " \
            if (out / "last.pt").is_file() else ""
        raise RingqError(f"output directory {out} is not empty; pass {hint}--overwrite to "
                         f"replace the run in it")


def _load_resume(path, task):
    """The training checkpoint at ``path``, its recorded config checked for ``task``."""
    ckpt = safe_load(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT
            and all(k in ckpt for k in RESUME_KEYS)):
        raise CheckpointError(f"{path}: not a training checkpoint of this project (expected "
                              f"a last.pt or best.pt written by train_*.py)")
    model = ckpt["config"].get("model") if isinstance(ckpt["config"], dict) else None
    owner = next((t for t, models in config_lib.TASK_MODELS.items() if model in models), task)
    if owner != task:
        raise CheckpointError(f"{path}: checkpoint of a {model} run; resume it with "
                              f"{SCRIPTS[owner]}")
    ckpt["config"] = config_lib.recorded_config(ckpt["config"], f"{path}: recorded config", task)
    return Resume(Path(path), ckpt)


def resolve_run(args, task):
    """Config dict and Resume (or None) of parsed training flags, all checked before any
    write. A fresh run gets the ``init_source`` of ``init_from`` and the ``distill_source``
    of ``distill_from`` (splits checked); a resumed run must find the teacher it had."""
    if not args.resume:
        cfg = config_lib.resolve(args, task)
        if cfg["init_from"] is not None:
            cfg["init_source"] = identity.load_source(cfg["init_from"], cfg, "--init-from")[1]
        if cfg["distill_from"] is not None:
            cfg["distill_source"] = identity.load_source(cfg["distill_from"], cfg,
                                                         "--distill-from")[1]
        return cfg, None
    resume = _load_resume(args.resume, task)
    recorded = resume.checkpoint["config"]
    cfg = config_lib.resolve(args, task, base={**recorded,
                                               "output_dir": str(resume.path.parent)})
    changed = [k for k in config_lib.FIXED_ON_RESUME if cfg[k] != recorded[k]]
    if changed:
        raise CheckpointError(
            f"{resume.path}: the checkpoint's {recorded['model']} run has "
            + ", ".join(f"{k}={recorded[k]!r}" for k in changed) + "; it cannot continue with "
            + ", ".join(f"{k}={cfg[k]!r}" for k in changed) + " (start a new run instead)")
    if cfg["distill_from"] is not None:
        found = identity.load_source(cfg["distill_from"], cfg, "--distill-from")[1]
        if identity.same_source(found) != identity.same_source(cfg["distill_source"] or {}):
            raise CheckpointError(f"{cfg['distill_from']}: not the teacher this run learnt from "
                                  f"(its identity differs from the recorded distill_source); "
                                  f"pass --distill-from with that checkpoint")
    return cfg, resume


def _write_metrics(history, path):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
    write_text_atomic(buf.getvalue(), path)


def load_datasets(cfg, dist_info, device):
    """(train, selection, test) ArrayDatasets and their loader settings.

    ``selection`` is the held-out validation split, or the test split under
    the published protocol (val_split 0).
    """
    data_dir = data_lib.check_data_dir(cfg["data_dir"], cfg["dataset"], cfg["download"])
    train, test = local_rank_first(dist_info, device, lambda: tuple(
        data_lib.load_split(cfg["dataset"], data_dir, split, download=cfg["download"])
        for split in ("train", "test")))
    val = None
    if cfg["val_split"]:
        if cfg["val_split"] >= len(train):
            raise RingqError(f"val_split {cfg['val_split']} is not smaller than the "
                             f"{len(train)} training images")
        train_idx, val_idx = data_lib.train_val_split(train.labels, cfg["val_split"],
                                                      cfg["val_seed"])
        train, val = train.subset(train_idx), train.subset(val_idx)
    if cfg["subset"]:
        if cfg["subset"] > len(train):
            raise RingqError(f"subset {cfg['subset']} is larger than the {len(train)} "
                             f"training images available")
        train = train.subset(data_lib.balanced_indices(train.labels, cfg["subset"], cfg["seed"]))
    if cfg["batch_size"] % dist_info.world_size:
        raise RingqError(f"batch_size {cfg['batch_size']} is not divisible by the "
                         f"{dist_info.world_size} processes")
    return train, val, test


def make_loaders(cfg, train, val, test, dist_info, device):
    mean, std = data_lib.NORMALIZATION[cfg["dataset"]]
    common = dict(mean=mean, std=std, device=device, seed=cfg["seed"], workers=cfg["workers"],
                  rank=dist_info.rank, world_size=dist_info.world_size)
    train_loader = data_lib.make_loader(cfg["loader"], train, cfg["batch_size"], shuffle=True,
                                        augment=cfg["dataset"] == "cifar10", **common)
    eval_batch = max(cfg["batch_size"], 256)
    eval_loaders = {name: data_lib.make_loader(cfg["loader"], ds, eval_batch, shuffle=False,
                                               augment=False, **common)
                    for name, ds in (("val", val), ("test", test)) if ds is not None}
    return train_loader, eval_loaders


def _log(dist_info, *msg):
    if dist_info.is_main:
        print(*msg, flush=True)


def _prepare_model(cfg, train, device, dist_info):
    images = train.images
    mcfg = config_lib.model_config(cfg, num_classes=len(train.classes),
                                   in_channels=images.shape[1], image_size=images.shape[-1])
    seed_everything(cfg["seed"])
    model = build_model(mcfg).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model, mcfg


def _init_from(model, mcfg, path):
    """Start ``model`` from the FP32 checkpoint at ``path`` (:func:`init_from_fp32`).

    CheckpointError (one line) when the file is unreadable, not FP32 or of another network.
    """
    fp32, fp32_config, _ = load_model_from_checkpoint(path)
    if fp32_config.get("quantization") != "none":
        raise CheckpointError(f"{path}: not an FP32 checkpoint (quantization "
                              f"{fp32_config.get('quantization')!r}); --init-from needs the "
                              f"last.pt or best.pt of a --quantization none run")
    if fp32_config.get("model") != mcfg["model"]:
        raise CheckpointError(f"{path}: holds a {fp32_config.get('model')}, this run trains a "
                              f"{mcfg['model']}")
    try:
        init_from_fp32(model, fp32.state_dict())
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _load_teacher(cfg, mcfg, device):
    """The frozen FP32 teacher of ``--distill-from`` (eval mode, no gradients), or None.

    CheckpointError (one line) unless it is an FP32 model of this run's network with
    this run's classes and input channels.
    """
    path = cfg["distill_from"]
    if path is None:
        return None
    teacher, tcfg, _ = load_model_from_checkpoint(path)
    if tcfg.get("quantization") != "none":
        raise CheckpointError(f"{path}: not an FP32 checkpoint (quantization "
                              f"{tcfg.get('quantization')!r}); --distill-from needs the last.pt "
                              f"or best.pt of a --quantization none run")
    for key, default in (("model", None), ("num_classes", 10), ("in_channels", None)):
        theirs, ours = tcfg.get(key, default), mcfg.get(key, default)
        if key != "in_channels" or theirs is not None:
            if theirs != ours:
                raise CheckpointError(f"{path}: the teacher has {key} {theirs!r}, this run's "
                                      f"network {ours!r}; --distill-from needs the same network")
    teacher = teacher.to(device).eval().requires_grad_(False)
    return teacher.to(memory_format=torch.channels_last) if cfg["channels_last"] else teacher


def _describe(summary):
    """What the log says about a model's weights."""
    if summary is None:
        return "FP32"
    if "bits" in summary:
        return (f"uniform {summary['bits']}-bit ({summary['num_distinct_values']} levels per "
                f"channel)")
    return (f"ring-{summary['ring_size']} ({summary['num_distinct_values']} distinct values, "
            f"{summary['effective_bits']:.2f} effective bits)")


def _wrap(model, cfg, device, dist_info):
    if dist_info.enabled:
        convert_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)
    return model


def _checkpoint(run, epoch, history, best):
    """Everything to resume or evaluate the run; ``sigma`` is the kernel width in effect."""
    summary = ring_summary(unwrap(run.model))  # sigma: ring models only
    return {"format": FORMAT, "version": 2, "config": run.cfg, "model_config": run.mcfg,
            "model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": {"type": "MultiStepLR", "milestones": list(run.cfg["schedule"]),
                          "gamma": run.cfg["gamma"], "base_lr": run.cfg["lr"],
                          "last_epoch": epoch, "next_lr": lr_at(run.cfg, epoch + 1)},
            "epoch": epoch, "history": history, "best": best,
            "sigma": summary["sigma"] if summary else None,
            "rng": {"torch": torch.get_rng_state()}}


def _differences(recorded, current):
    """``key recorded -> current`` for every key where two model configs differ."""
    recorded = recorded if isinstance(recorded, dict) else {}
    return ", ".join(f"{k} {recorded.get(k)!r} -> {current.get(k)!r}"
                     for k in sorted(set(recorded) | set(current))
                     if recorded.get(k) != current.get(k))


def _restore(resume, model, optimizer, mcfg):
    """Load a Resume's weights and optimizer state: (history, best, first epoch, rng state)."""
    ckpt, path = resume.checkpoint, resume.path
    if ckpt["model_config"] != mcfg:
        raise CheckpointError(f"{path}: the checkpoint's model does not fit this data "
                              f"({_differences(ckpt['model_config'], mcfg)})")
    load_state(model, ckpt["model"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        return (list(ckpt["history"]), dict(ckpt["best"]), int(ckpt["epoch"]) + 1,
                ckpt["rng"]["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the training state does not fit this run "
                              f"({type(e).__name__}: {e})") from None


def _prepare_output(out, cfg, resume, overwrite, history):
    """Create ``out``, clear what a crash or a replaced run left there, write config.yaml.

    Resuming the run in ``out`` removes only its final.json (the run is not
    finished any more); ``--overwrite`` removes the files of the run it replaces.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RingqError(f"cannot create output directory {out}: {e.strerror or e}") from None
    remove_stale_temps(out, RUN_FILES)
    stale = ("final.json",) if _own_run(out, resume) else RUN_FILES if overwrite else ()
    for name in stale:
        (out / name).unlink(missing_ok=True)
    config_lib.save_yaml(portable_config(cfg), out / "config.yaml")  # the checkpoints keep
    # the full config, so that --resume finds the data again
    if history:
        _write_metrics(history, out / "metrics.csv")


def _resume_hint(task, out, resume):
    """How to continue after an interruption: the checkpoint on disk and the command."""
    path = out / "last.pt" if (out / "last.pt").is_file() else resume.path if resume else None
    if path is None:
        return "no checkpoint was written yet; start the run again"
    return f"last completed epoch saved in {path}; continue with: python {SCRIPTS[task]} " \
        f"--resume {path}"


def _check_stop(stop, device, when):
    """Raise Interrupted if a signal arrived (on any process)."""
    if stop.requested(device):
        raise Interrupted(f"{stop.received or 'a signal'} received {when}")


class _Run(NamedTuple):
    """What the epoch loop works with."""
    cfg: dict
    mcfg: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: object
    eval_loaders: dict
    select_split: str
    base_sigma: float
    device: torch.device
    precision: str
    dist_info: object
    stop: StopSignals
    teacher: torch.nn.Module  # or None


def train(cfg, resume, task, overwrite=False):
    """Run (or continue, from a Resume) training for a resolved config; returns final.json's dict.

    ``overwrite`` allows replacing the run in a non-empty output directory.
    """
    device = resolve_device(cfg["device"])
    precision = resolve_precision(cfg["precision"], device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank if dist_info.enabled
                              else (device.index or 0))
    out = Path(cfg["output_dir"])
    finished = False
    try:
        _check_output_dir(out, resume, overwrite)
        with StopSignals() as stop, determinism(cfg["deterministic"], device):
            final = _train(cfg, resume, overwrite, out, device, precision, dist_info, stop)
        finished = True
        return final
    except (Interrupted, NonFiniteError) as e:
        raise type(e)(f"{e}; {_resume_hint(task, out, resume)}") from None
    finally:
        cleanup(finished)


def _setup(cfg, resume, overwrite, out, device, precision, dist_info, stop):
    """Load data, build (or restore) model and optimizer, prepare ``out``.

    Returns (run, history, best, first epoch, torch RNG state to start from or None).
    """
    train_set, val_set, test_set = load_datasets(cfg, dist_info, device)
    model, mcfg = _prepare_model(cfg, train_set, device, dist_info)
    summary, ring = quant_summary(model), ring_summary(model)
    base_sigma = ring["sigma"] if ring else None
    if cfg["init_from"] is not None and resume is None:
        apply_epoch_schedule(model, cfg, base_sigma, 1)  # match the weights epoch 1 starts with
        _init_from(model, mcfg, cfg["init_from"])
    teacher = _load_teacher(cfg, mcfg, device)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg["lr"],
                                momentum=cfg["momentum"])
    history, best, start_epoch, rng = [], {"epoch": 0, "accuracy": -1.0}, 1, None
    if resume is not None:
        history, best, start_epoch, rng = _restore(resume, model, optimizer, mcfg)
    cfg = {**cfg, "precision_used": precision, "versions": library_versions(),
           "git": identity.git_state(), "fingerprint": identity.fingerprints(cfg)}
    model = _wrap(model, cfg, device, dist_info)
    train_loader, eval_loaders = make_loaders(cfg, train_set, val_set, test_set, dist_info, device)
    if dist_info.is_main:
        _prepare_output(out, cfg, resume, overwrite, history)
    _log(dist_info, f"run {out}: {cfg['model']} {_describe(summary)}"
         + (f" from {cfg['init_from']}" if cfg["init_from"] else "")
         + (f", distilled from {cfg['distill_from']} (weight {cfg['distill_weight']:g}, "
            f"temperature {cfg['distill_temperature']:g})" if teacher is not None else "")
         + f", {count_parameters(unwrap(model)):,} parameters, {len(train_set)} training images, "
         f"device {device} ({precision}), {dist_info.world_size} process(es)")
    select_split = "val" if val_set is not None else "test"
    if select_split == "test":
        _log(dist_info, "model selection on the TEST split (published protocol); pass "
                        "--val-split N for an honest held-out selection")
    run = _Run(cfg, mcfg, model, optimizer, train_loader, eval_loaders, select_split,
               base_sigma, device, precision, dist_info, stop, teacher)
    return run, history, best, start_epoch, rng


def _run_epoch(run, epoch):
    """Train and evaluate one epoch: (metrics row, (selection mode, its accuracy), train stats).

    Row columns eval_loss / eval_acc hold the first of the model's modes (soft for ring
    models, hard for uniform ones, fp32); eval_hard_* hold hard mode's.
    """
    cfg, start = run.cfg, time.time()
    apply_epoch_schedule(unwrap(run.model), cfg, run.base_sigma, epoch)
    lr = lr_at(cfg, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    run.train_loader.set_epoch(epoch)
    progress = not cfg["quiet"] and run.dist_info.is_main
    stats = train_one_epoch(run.model, run.train_loader, run.optimizer, cfg, epoch, run.device,
                            run.stop, progress, run.precision, run.teacher)
    results = evaluate_all_modes(run.model, run.eval_loaders[run.select_split], run.device,
                                 cfg["channels_last"])
    first, hard = next(iter(results.values())), results.get("hard")  # soft, hard or fp32
    ring = run.base_sigma is not None
    row = {"epoch": epoch, "lr": lr,
           "sigma": f"{sigma_at(cfg, run.base_sigma, epoch):.6g}" if ring else "",
           "weight_mode": train_mode_at(cfg, epoch) if ring else "hard" if hard else "fp32",
           "train_loss": f"{stats['loss']:.6f}", "train_acc": f"{stats['accuracy']:.4f}",
           "eval_split": run.select_split, "eval_loss": f"{first['loss']:.6f}",
           "eval_acc": f"{first['accuracy']:.4f}",
           "eval_hard_loss": f"{hard['loss']:.6f}" if hard else "",
           "eval_hard_acc": f"{hard['accuracy']:.4f}" if hard else "",
           "skipped_steps": stats["skipped_steps"], "time_s": f"{time.time() - start:.2f}"}
    mode = cfg["select_mode"] if cfg["select_mode"] in results else next(iter(results))
    return row, (mode, results[mode]["accuracy"]), stats


def _epoch_line(run, row, stats, best):
    """The log line of one finished epoch."""
    if row["sigma"]:
        hard = f"soft {float(row['eval_acc']):.2f} hard {float(row['eval_hard_acc']):.2f}"
    else:
        hard = f"{'hard' if row['eval_hard_acc'] else 'acc'} {float(row['eval_acc']):.2f}"
    return (f"epoch {row['epoch']}/{run.cfg['epochs']} lr {row['lr']:.4g} | train loss "
            f"{stats['loss']:.4f} acc {stats['accuracy']:.2f} | {run.select_split} {hard} | "
            f"best {best['accuracy']:.2f} (epoch {best['epoch']}) | {row['time_s']}s"
            + (f" | {stats['skipped_steps']} steps skipped" if stats["skipped_steps"] else ""))


def _train(cfg, resume, overwrite, out, device, precision, dist_info, stop):
    run, history, best, start_epoch, rng = _setup(cfg, resume, overwrite, out, device,
                                                  precision, dist_info, stop)
    main_process = dist_info.is_main
    if rng is not None:
        torch.set_rng_state(rng)
    elif main_process:
        save_atomic(_checkpoint(run, 0, history, best), out / "last.pt")
    _check_stop(stop, device, "before training started")
    for epoch in range(start_epoch, run.cfg["epochs"] + 1):
        row, (mode, score), stats = _run_epoch(run, epoch)
        history.append(row)
        improved = score > best["accuracy"]
        if improved:
            best = {"epoch": epoch, "accuracy": score, "mode": mode, "split": run.select_split}
        if main_process:
            ckpt = _checkpoint(run, epoch, history, best)
            if improved:
                save_atomic(ckpt, out / "best.pt")
            save_atomic(ckpt, out / "last.pt")
            _write_metrics(history, out / "metrics.csv")
        _log(dist_info, _epoch_line(run, row, stats, best))
        _check_stop(stop, device, f"during epoch {epoch}; stopped once it was saved")
    results = evaluate_all_modes(run.model, run.eval_loaders["test"], device,
                                 run.cfg["channels_last"])
    _check_stop(stop, device, "during the final evaluation")
    final = report_dict(unwrap(run.model), run.mcfg, results, checkpoint="last.pt")
    final.update(best=best, fingerprint=run.cfg["fingerprint"], git=run.cfg["git"],
                 split=identity.describe_split(identity.split_of(run.cfg)))
    if main_process:
        write_text_atomic(json.dumps(final, indent=2) + "\n", out / "final.json")
    _log(dist_info, "final test accuracy: " + ", ".join(
        f"{m} {r['accuracy']:.2f}" for m, r in results.items()) + f" -> {out / 'final.json'}")
    return final


def main(task, argv=None):
    def _main(argv):
        args = get_args_parser(task).parse_args(argv)
        cfg, resume = resolve_run(args, task)
        return train(cfg, resume, task, overwrite=args.overwrite)
    return run_cli(_main, argv)
