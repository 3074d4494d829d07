"""The training run behind ``train_cifar10.py`` and ``train_mnist.py``.

``main(task, argv)`` parses flags, resolves the config, checks every input
before touching the disk, then trains with per-epoch checkpoints
(``last.pt``, ``best.pt``), ``metrics.csv`` and a final ``final.json``.
"""
import argparse
import csv
import io
import json
import os
import time
from pathlib import Path

import torch

from models import build_model
from models.utils import count_parameters, ring_summary

from . import config as config_lib
from . import data as data_lib
from .checkpoint import FORMAT, safe_load, save_atomic
from .distributed import cleanup, convert_batchnorm, init_distributed, unwrap
from .engine import (StopSignals, apply_epoch_schedule, evaluate, evaluate_all_modes,
                     sigma_at, train_mode_at, train_one_epoch)
from .errors import CheckpointError, RingqError
from .runtime import library_versions, resolve_device, run_cli, seed_everything

TASK_TITLES = {"cifar10": "Train a ring-quantized (or FP32) ResNet on CIFAR-10.",
               "mnist": "Train a ring-quantized (or FP32) MLP or LeNet on MNIST / Fashion-MNIST."}
METRIC_FIELDS = ["epoch", "lr", "sigma", "weight_mode", "train_loss", "train_acc", "eval_split",
                 "eval_loss", "eval_acc", "eval_hard_loss", "eval_hard_acc", "time_s"]


def get_args_parser(task):
    parser = argparse.ArgumentParser(
        description=TASK_TITLES[task],
        epilog="Every option can also be set in a YAML file given with --config "
               "(keys as the flags, with underscores); flags override the file.")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue the run saved in CHECKPOINT (its last.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into an existing, non-empty output directory")
    config_lib.add_options(parser)
    return parser


def _check_output_dir(path, resume):
    """Refuse a run directory that is a file, unwritable, or holds a run we'd overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RingqError(f"output directory {path} exists and is not a directory")
    parent = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise RingqError(f"output directory {path} is not writable")
    if path.is_dir() and any(path.iterdir()) and not resume:
        return False
    return True


def _load_resume(path, cfg_given):
    """Read a checkpoint to resume; returns it. The config is taken from the checkpoint."""
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "optimizer" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (expected "
                              f"a last.pt or best.pt written by train_*.py)")
    return ckpt


def _resolve(args, task):
    """Config dict and resume checkpoint (or None), all checked before any write."""
    resume = None
    if getattr(args, "resume", None):
        resume = _load_resume(args.resume, vars(args))
        base = dict(resume["config"])
        given = {k: v for k, v in vars(args).items() if k in config_lib.OPTION_BY_NAME}
        if getattr(args, "config", None):
            given = {**config_lib.load_yaml(args.config), **given}
        for key in ("model", "quantization", "ring_size", "ring_type", "ring_layout",
                    "interpolation", "dataset"):
            if key in given and given[key] != base[key]:
                raise CheckpointError(
                    f"{args.resume}: checkpoint is a {base['model']} ({base['quantization']}, "
                    f"ring {base['ring_size']}) run on {base['dataset']}; it cannot resume "
                    f"{key}={given[key]!r}")
        base.update(given)
        base["output_dir"] = given.get("output_dir", str(Path(args.resume).parent))
        config_lib.validate(base, task)
        return base, resume
    return config_lib.resolve(args, task), None


def _param_groups(model, cfg):
    """SGD groups: ring positions (position_weight_decay) and everything else."""
    positions = [p for n, p in model.named_parameters() if n.endswith("positions")]
    others = [p for n, p in model.named_parameters() if not n.endswith("positions")]
    wd_pos = cfg["position_weight_decay"]
    groups = [{"params": others, "weight_decay": cfg["weight_decay"]}]
    if positions:
        groups.append({"params": positions,
                       "weight_decay": cfg["weight_decay"] if wd_pos is None else wd_pos})
    return groups


def _write_metrics(history, path):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def _write_json(obj, path):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_datasets(cfg, dist_info, device):
    """(train, selection, test) ArrayDatasets and their loader settings.

    ``selection`` is the held-out validation split, or the test split under
    the published protocol (val_split 0).
    """
    data_dir = cfg["data_dir"]
    train = data_lib.load_split(cfg["dataset"], data_dir, "train", download=cfg["download"])
    test = data_lib.load_split(cfg["dataset"], data_dir, "test", download=cfg["download"])
    val = None
    if cfg["val_split"]:
        if cfg["val_split"] >= len(train):
            raise RingqError(f"val_split {cfg['val_split']} is not smaller than the "
                             f"{len(train)} training images")
        train_idx, val_idx = data_lib.train_val_split(train.labels, cfg["val_split"], cfg["seed"])
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
                                        augment=cfg["dataset"] == "cifar10",
                                        drop_last=dist_info.enabled, **common)
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


def _wrap(model, cfg, device, dist_info):
    if dist_info.enabled:
        convert_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        model = torch.compile(model)
    return model


def _checkpoint(model, optimizer, scheduler, cfg, mcfg, epoch, history, best):
    return {"format": FORMAT, "version": 1, "config": cfg, "model_config": mcfg,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
            "best": best, "rng": {"torch": torch.get_rng_state()}}


def train(cfg, resume, task):
    """Run (or continue) training for a resolved config; returns final results dict."""
    device = resolve_device(cfg["device"])
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank if dist_info.enabled
                              else (device.index or 0))
        torch.backends.cudnn.benchmark = True
    try:
        return _train(cfg, resume, task, device, dist_info)
    finally:
        cleanup()


def _train(cfg, resume, task, device, dist_info):
    out = Path(cfg["output_dir"])
    if not _check_output_dir(out, resume) and not cfg.get("_overwrite"):
        raise RingqError(f"output directory {out} already holds a run; pass --resume "
                         f"{out / 'last.pt'} to continue it or --overwrite to replace it")
    train_set, val_set, test_set = load_datasets(cfg, dist_info, device)
    model, mcfg = _prepare_model(cfg, train_set, device, dist_info)
    base_sigma = ring_summary(model)["sigma"] if ring_summary(model) else None
    optimizer = torch.optim.SGD(_param_groups(model, cfg), lr=cfg["lr"],
                                momentum=cfg["momentum"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg["schedule"], cfg["gamma"])
    history, best, start_epoch = [], {"epoch": 0, "accuracy": -1.0}, 1
    if resume is not None:
        if resume["model_config"] != mcfg:
            raise CheckpointError("resume checkpoint was trained with another model or data "
                                  f"shape: {resume['model_config']} vs {mcfg}")
        from .checkpoint import load_state
        load_state(model, resume["model"], "resume checkpoint")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"]["torch"])
        history, best, start_epoch = resume["history"], resume["best"], resume["epoch"] + 1
    cfg = {**cfg, "versions": library_versions()}
    cfg.pop("_overwrite", None)
    model = _wrap(model, cfg, device, dist_info)
    train_loader, eval_loaders = make_loaders(cfg, train_set, val_set, test_set, dist_info, device)
    select_split = "val" if val_set is not None else "test"
    progress = not cfg["quiet"] and dist_info.is_main
    summary = ring_summary(unwrap(model))
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_lib.save_yaml(cfg, out / "config.yaml")
    _log(dist_info, f"run {out}: {cfg['model']} "
         + (f"ring-{summary['ring_size']} ({summary['num_distinct_values']} distinct values, "
            f"{summary['effective_bits']:.2f} effective bits)" if summary else "FP32")
         + f", {count_parameters(unwrap(model)):,} parameters, {len(train_set)} training images, "
         f"device {device}, {dist_info.world_size} process(es)")
    if select_split == "test":
        _log(dist_info, "model selection on the TEST split (published protocol); pass "
                        "--val-split N for an honest held-out selection")
    if resume is None and dist_info.is_main:
        save_atomic(_checkpoint(model, optimizer, scheduler, cfg, mcfg, 0, history, best),
                    out / "last.pt")
    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg["epochs"] + 1):
            start = time.time()
            apply_epoch_schedule(unwrap(model), cfg, base_sigma, epoch)
            train_loader.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            stats = train_one_epoch(model, train_loader, optimizer, cfg, epoch, device, stop,
                                    progress)
            scheduler.step()
            loader = eval_loaders[select_split]
            soft = evaluate(model, loader, device, "soft" if summary else None, cfg["amp"])
            hard = evaluate(model, loader, device, "hard", cfg["amp"]) if summary else None
            row = {"epoch": epoch, "lr": lr,
                   "sigma": f"{sigma_at(cfg, base_sigma, epoch):.6g}" if summary else "",
                   "weight_mode": train_mode_at(cfg, epoch) if summary else "fp32",
                   "train_loss": f"{stats['loss']:.6f}", "train_acc": f"{stats['accuracy']:.4f}",
                   "eval_split": select_split, "eval_loss": f"{soft['loss']:.6f}",
                   "eval_acc": f"{soft['accuracy']:.4f}",
                   "eval_hard_loss": f"{hard['loss']:.6f}" if hard else "",
                   "eval_hard_acc": f"{hard['accuracy']:.4f}" if hard else "",
                   "time_s": f"{time.time() - start:.2f}"}
            history.append(row)
            score = (hard if cfg["select_mode"] == "hard" else soft)["accuracy"]
            improved = score > best["accuracy"]
            if improved:
                best = {"epoch": epoch, "accuracy": score, "mode": cfg["select_mode"] if summary
                        else "fp32", "split": select_split}
            if dist_info.is_main:
                ckpt = _checkpoint(model, optimizer, scheduler, cfg, mcfg, epoch, history, best)
                if improved:
                    save_atomic(ckpt, out / "best.pt")
                save_atomic(ckpt, out / "last.pt")
                _write_metrics(history, out / "metrics.csv")
            _log(dist_info, f"epoch {epoch}/{cfg['epochs']} lr {lr:.4g} | train loss "
                 f"{stats['loss']:.4f} acc {stats['accuracy']:.2f} | {select_split} "
                 + (f"soft {soft['accuracy']:.2f} hard {hard['accuracy']:.2f}" if hard
                    else f"acc {soft['accuracy']:.2f}")
                 + f" | best {best['accuracy']:.2f} (epoch {best['epoch']}) | "
                 f"{time.time() - start:.1f}s"
                 + (f" | {stats['skipped_steps']} steps skipped" if stats["skipped_steps"] else ""))
    results = evaluate_all_modes(model, eval_loaders["test"], device, cfg["amp"])
    final = report_dict(unwrap(model), mcfg, results, checkpoint=str(out / "last.pt"))
    final["best"] = best
    if dist_info.is_main:
        _write_json(final, out / "final.json")
    _log(dist_info, "final test accuracy: " + ", ".join(
        f"{m} {r['accuracy']:.2f}" for m, r in results.items()) + f" -> {out / 'final.json'}")
    return final


def report_dict(model, mcfg, results, **extra):
    """The JSON schema shared by evaluate.py --json and final.json."""
    summary = ring_summary(model)
    out = {"accuracy": {m: round(r["accuracy"], 4) for m, r in results.items()},
           "loss": {m: round(r["loss"], 6) for m, r in results.items()},
           "num_examples": next(iter(results.values()))["num_examples"],
           "model": mcfg["model"], "quantization": mcfg["quantization"],
           "parameters": count_parameters(model)}
    if summary:
        out.update({k: summary[k] for k in ("ring_size", "ring_type", "ring_layout",
                                            "nominal_bits", "num_distinct_values",
                                            "effective_bits", "distinct_values")})
    out.update(extra)
    return out


def main(task, argv=None):
    def _main(argv):
        args = get_args_parser(task).parse_args(argv)
        cfg, resume = _resolve(args, task)
        if args.overwrite:
            cfg["_overwrite"] = True
        return train(cfg, resume, task)
    return run_cli(_main, argv)
