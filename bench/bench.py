#!/usr/bin/env python3
"""Benchmark of ring quantization's costs: a report, not a timed test.

    python bench/bench.py [--json OUT] [--data-dir DIR] [--device auto|cpu|cuda]
                          [--quick] [--repeats R] [--threads T]

(a) training step (the engine's ``train_one_epoch``) of k-bit ring-4 ResNet-20 vs FP32
    ResNet-20, in FP32 with NCHW and in the fast setting (``--precision auto
    --channels-last``), interleaved repeats, medians; (b) peak extra memory of one
    interpolation forward+backward (memory-lean ``soft_values`` and the published
    formula ``reference_soft_values``) per byte of positions, each in a fresh process;
(c) training-data throughput of the in-memory loader vs the torchvision
    DataLoader (2 workers); (d) eval throughput in soft, hard and FP32 modes;
(e) one full-data training epoch plus the validation pass per model and setting,
    and the projected 200-epoch time.

Memory (b), for ``soft_values(positions, ring, sigma, table=...)`` then
``.backward(grad)`` on a 4096x4096 RingLinear's positions at N=8, with the
interpolation table prebuilt as the layers cache it (``interp_memory_ratio``)
and built inside the call (``interp_memory_ratio_with_table_build``), and for
``reference_soft_values`` (``naive_interp_memory_ratio``); each in a fresh
process, divided by the positions' bytes. On CUDA: max_memory_allocated minus
memory_allocated just before the pass. On CPU (Linux): peak RSS (VmHWM, the
process's own high-water mark; ru_maxrss would also carry the parent's RSS
at exec), first reset to the current RSS through /proc/self/clear_refs where
the kernel allows, minus the RSS just before the pass, once positions,
upstream gradient and a small warm-up pass exist. Every temporary is written,
so all of it is resident; glibc is told to mmap every block over 128 KiB
(MALLOC_MMAP_THRESHOLD_) so freed blocks leave RSS instead of being recycled
unseen. The positions' gradient (one positions-sized tensor) is counted.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model  # noqa: E402
from models.ring_layers import RingLinear, RingQuantizer  # noqa: E402
from models.ring_math import reference_soft_values, soft_values  # noqa: E402
from models.utils import set_weight_mode  # noqa: E402
from ringq import data as data_lib  # noqa: E402
from ringq.engine import evaluate_all_modes, train_one_epoch  # noqa: E402
from ringq.precision import resolve_precision  # noqa: E402
from ringq.runtime import resolve_device  # noqa: E402

TARGETS = {"train_step_ratio": ("<=", 1.10), "fast_step_fraction": ("<=", 0.42),
           "fast_epoch_s": ("<=", 50.0), "interp_memory_ratio": ("<=", 3.0),
           "data_path_speedup": (">=", 10.0)}
FULL = dict(train_batch=128, warmup_steps=3, steps_per_repeat=8, repeats=7, probe_side=4096,
            synthetic_images=50_000, memory_passes=3, torchvision_batches=200,
            eval_batch=500, eval_batches=2, epoch_train=45_000, epoch_val=5_000)
QUICK = dict(train_batch=32, warmup_steps=1, steps_per_repeat=1, repeats=2, probe_side=1024,
             synthetic_images=2048, memory_passes=1, torchvision_batches=4,
             eval_batch=100, eval_batches=1, epoch_train=256, epoch_val=64)
PROBES = ("soft", "soft_cold", "naive")
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--data-dir", metavar="DIR", help="CIFAR-10 directory for (c) "
                        "(default: a synthetic 50,000-image uint8 set)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--repeats", type=int, help="interleaved repeats for (a) and (d)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--_memory-probe", dest="memory_probe", choices=PROBES,
                        help=argparse.SUPPRESS)
    parser.add_argument("--_probe-side", dest="probe_side", type=int, help=argparse.SUPPRESS)
    return parser


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of ``fn`` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved_medians(tasks, repeats, device):
    """{name: median seconds} over ``repeats`` rounds that run every task once, in turn."""
    times = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


# ResNet-20 at ring 4 in the k-bit recipe's layout (distinct levels, sigma 2), and FP32
MODELS = {"ring": dict(model="resnet20", quantization="ring", ring_size=4,
                       ring_layout="distinct", sigma=2.0),
          "fp32": dict(model="resnet20", quantization="none")}


def resnet20(name, device, channels_last=False):
    torch.manual_seed(0)
    model = build_model(MODELS[name]).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def settings(device):
    """{name: (precision, channels_last)}: what training did before (FP32, NCHW) and the
    fast setting (``--precision auto --channels-last``)."""
    return {"fp32_nchw": ("fp32", False),
            "fast": (resolve_precision("auto", device), True)}


def train_config(channels_last):
    """The engine's per-step options at the published defaults."""
    return {"channels_last": channels_last, "clip_grad": 5.0, "nan_policy": "stop"}


class FixedBatches:
    """``count`` copies of one batch (x, y), with the loader interface the engine reads."""

    def __init__(self, x, y, count):
        self.x, self.y, self.count = x, y, count

    def __iter__(self):
        return iter([(self.x, self.y)] * self.count)

    def __len__(self):
        return self.count

    def global_batch_sizes(self):
        return [self.y.numel()] * self.count


# ---- (a) training step ------------------------------------------------------------------------

def optimizer_for(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def bench_train_step(device, cfg, repeats):
    """Median ms per training step (the engine's ``train_one_epoch``) of ring-4 and FP32
    ResNet-20, in each of :func:`settings`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["train_batch"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (cfg["train_batch"],), generator=g).to(device)
    tasks, modes = {}, settings(device)
    for setting, (precision, channels_last) in modes.items():
        for name in MODELS:
            model = resnet20(name, device, channels_last)
            optimizer = optimizer_for(model)
            opts = train_config(channels_last)

            def steps(count, model=model, optimizer=optimizer, opts=opts, precision=precision):
                return lambda: train_one_epoch(model, FixedBatches(x, y, count), optimizer, opts,
                                               1, device, progress=False, precision=precision)
            steps(cfg["warmup_steps"])()
            tasks[setting, name] = steps(cfg["steps_per_repeat"])
    ms = {k: 1000 * v / cfg["steps_per_repeat"]
          for k, v in interleaved_medians(tasks, repeats, device).items()}
    per_step = {setting: {name: ms[setting, name] for name in MODELS} for setting in modes}
    return {"train_step_ratio": per_step["fast"]["ring"] / per_step["fast"]["fp32"],
            "fast_step_fraction": per_step["fast"]["ring"] / per_step["fp32_nchw"]["ring"],
            "train_step_ms": per_step, "train_batch": cfg["train_batch"],
            "fast_precision": modes["fast"][0]}


# ---- (e) training epoch -----------------------------------------------------------------------

def epoch_split(data_dir, cfg):
    """(train, val) ArrayDatasets: CIFAR-10 train from ``data_dir`` less a class-balanced
    validation split of ``epoch_val`` images, else synthetic images of those sizes."""
    if data_dir:
        ds = data_lib.load_split("cifar10", data_dir, "train", download=False)
        train_idx, val_idx = data_lib.train_val_split(ds.labels, cfg["epoch_val"], 0)
        return ds.subset(train_idx), ds.subset(val_idx), f"CIFAR-10 train from {data_dir}"
    ds, source = training_images(None, cfg["epoch_train"] + cfg["epoch_val"])
    n = cfg["epoch_train"]
    return ds.subset(torch.arange(n)), ds.subset(torch.arange(n, len(ds))), source


def bench_epoch(device, cfg, data_dir):
    """Seconds of one training epoch plus the validation pass (soft and hard for ring
    models), as ``train_cifar10.py`` runs them, per model and setting; and the projected
    200-epoch time in minutes."""
    train, val, source = epoch_split(data_dir, cfg)
    mean, std = data_lib.NORMALIZATION["cifar10"]
    common = dict(mean=mean, std=std, device=device, seed=0)
    train_loader = data_lib.make_loader("memory", train, 128, shuffle=True, augment=True, **common)
    val_loader = data_lib.make_loader("memory", val, 256, shuffle=False, augment=False, **common)
    seconds = {}
    for setting, (precision, channels_last) in settings(device).items():
        seconds[setting] = {}
        for name in MODELS:
            model = resnet20(name, device, channels_last)
            optimizer, opts = optimizer_for(model), train_config(channels_last)

            def epoch(model=model, optimizer=optimizer, opts=opts, precision=precision,
                      channels_last=channels_last):
                train_one_epoch(model, train_loader, optimizer, opts, 1, device,
                                progress=False, precision=precision)
                evaluate_all_modes(model, val_loader, device, channels_last)
            seconds[setting][name] = timed(epoch, device)
    return {"epoch_s": seconds, "fast_epoch_s": max(seconds["fast"].values()),
            "projected_200_epoch_min": {s: {n: 200 * v / 60 for n, v in t.items()}
                                        for s, t in seconds.items()},
            "epoch_images": {"train": len(train), "val": len(val)}, "epoch_source": source}


# ---- (b) interpolation memory -----------------------------------------------------------------

def _status_bytes(field):
    """A VmRSS / VmHWM line of /proc/self/status, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_rss():
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def interpolation(kind, quantizer, ring):
    """positions -> ring values, as probe ``kind`` measures it."""
    if kind == "naive":
        return lambda p: reference_soft_values(p, ring, quantizer.sigma)
    if kind == "soft_cold":
        return lambda p: soft_values(p, ring, quantizer.sigma)
    table = quantizer.table(ring)
    return lambda p: soft_values(p, ring, quantizer.sigma, table=table)


def memory_probe(kind, side, device):
    """Peak extra bytes of one interpolation forward+backward at ring 8 (run in a fresh process)."""
    layer = RingLinear(side, side, RingQuantizer(ring_size=8)).to(device)
    positions, ring = layer.positions, layer.ring_template
    fn = interpolation(kind, layer.quantizer, ring)
    grad = torch.randn_like(positions)
    small = torch.rand(64, device=device, requires_grad=True)
    fn(small).backward(torch.ones_like(small))  # loads kernels
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(positions).backward(grad)
        sync(device)
        peak, exact = torch.cuda.max_memory_allocated(device), True
    else:
        exact = _reset_peak_rss()
        before = _status_bytes("VmRSS")
        fn(positions).backward(grad)
        peak = _status_bytes("VmHWM")
    return {"extra_bytes": peak - before,
            "positions_bytes": positions.numel() * positions.element_size(), "peak_reset": exact}


def run_memory_probe(kind, side, device):
    """memory_probe in a fresh Python process; its result dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-probe", kind,
           "--_probe-side", str(side), "--device", str(device)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, **PROBE_ENV})
    if proc.returncode:
        raise RuntimeError(f"memory probe {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(device, cfg):
    side = cfg["probe_side"]
    probes = {kind: run_memory_probe(kind, side, device) for kind in PROBES}
    size = probes["soft"]["positions_bytes"]
    extra = {kind: p["extra_bytes"] for kind, p in probes.items()}
    return {"interp_memory_ratio": extra["soft"] / size,
            "interp_memory_ratio_with_table_build": extra["soft_cold"] / size,
            "naive_interp_memory_ratio": extra["naive"] / size,
            "interp_memory_bytes": {"positions": size, **extra},
            "interp_layer": f"{side}x{side}",
            "peak_reset": all(p["peak_reset"] for p in probes.values())}


# ---- (c) data path ----------------------------------------------------------------------------

def training_images(data_dir, n_synthetic):
    """(ArrayDataset, description): CIFAR-10 train from ``data_dir``, else random uint8 images."""
    if data_dir:
        ds = data_lib.load_split("cifar10", data_dir, "train", download=False)
        return ds, f"CIFAR-10 train from {data_dir}"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_synthetic, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_synthetic,), generator=g)
    return data_lib.ArrayDataset(images, labels, [str(i) for i in range(10)]), \
        f"synthetic {n_synthetic}x3x32x32 uint8"


def loader(kind, ds, device):
    mean, std = data_lib.NORMALIZATION["cifar10"]
    return data_lib.make_loader(kind, ds, 128, mean, std, device, shuffle=True, augment=True,
                                seed=0, workers=2)


def memory_throughput(ds, device, passes):
    """Images/s of full passes of the in-memory loader (median pass; one warm-up pass)."""
    batches = loader("memory", ds, device)

    def one_pass(epoch):
        batches.set_epoch(epoch)
        return sum(x.shape[0] for x, _ in batches)
    one_pass(0)
    times = [timed(lambda e=e: one_pass(e), device) for e in range(1, passes + 1)]
    return len(ds) / statistics.median(times)


def torchvision_throughput(ds, device, num_batches):
    """Images/s of the torchvision DataLoader path, batches moved to ``device``.

    Timed from the first batch's arrival (worker start-up excluded) over
    ``num_batches`` further batches.
    """
    batches = loader("torchvision", ds, device)
    batches.set_epoch(1)
    it = iter(batches)
    next(it)
    sync(device)
    start, count = time.perf_counter(), 0
    for _ in range(num_batches):
        x, _ = next(it)
        count += x.to(device, non_blocking=True).shape[0]
    sync(device)
    return count / (time.perf_counter() - start)


def bench_data(device, cfg, data_dir):
    ds, source = training_images(data_dir, cfg["synthetic_images"])
    batches = min(cfg["torchvision_batches"], len(ds) // 128 - 1)
    memory = memory_throughput(ds, device, cfg["memory_passes"])
    tv = torchvision_throughput(ds, device, batches)
    return {"data_path_speedup": memory / tv,
            "data_images_per_s": {"memory": memory, "torchvision": tv},
            "data_source": source, "torchvision_batches": batches}


# ---- (d) eval throughput ----------------------------------------------------------------------

def eval_batches(model, x, count):
    @torch.no_grad()
    def run():
        for _ in range(count):
            model(x)
    return run


def bench_eval(device, cfg, repeats):
    """Images/s of ResNet-20 in eval mode: ring soft, ring hard, FP32 (interleaved, medians)."""
    x = torch.randn(cfg["eval_batch"], 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    tasks = {}
    for mode, name in (("soft", "ring"), ("hard", "ring"), ("fp32", "fp32")):
        model = resnet20(name, device).eval()
        if name == "ring":
            set_weight_mode(model, mode)
        eval_batches(model, x, 1)()  # warm-up, fills the ring weight caches
        tasks[mode] = eval_batches(model, x, cfg["eval_batches"])
    images = cfg["eval_batch"] * cfg["eval_batches"]
    medians = interleaved_medians(tasks, repeats, device)
    return {"eval_images_per_s": {k: images / v for k, v in medians.items()},
            "eval_batch": cfg["eval_batch"]}


# ---- report -----------------------------------------------------------------------------------

def environment(device):
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def target_checks(results):
    checks = {}
    for key, (op, bound) in TARGETS.items():
        value = results[key]
        checks[key] = {"target": f"{op} {bound}",
                       "met": value <= bound if op == "<=" else value >= bound}
    return checks


def format_environment(env):
    return (f"device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}, "
            f"torch {env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs, "
            f"load average {env['load_average_1min']:.2f}")


def format_report(r):
    ms, mem, img, ev = (r["train_step_ms"], r["interp_memory_bytes"], r["data_images_per_s"],
                        r["eval_images_per_s"])
    slow, fast, epoch = ms["fp32_nchw"], ms["fast"], r["epoch_s"]
    mib = 2 ** 20
    rows = [
        ("(a) train step ring/fp32", f"{r['train_step_ratio']:.3f}",
         f"fast ({r['fast_precision']}, channels-last): ring-4 {fast['ring']:.1f} ms, "
         f"fp32 {fast['fp32']:.1f} ms (batch {r['train_batch']})"),
        ("(a) ring fast / fp32-nchw", f"{r['fast_step_fraction']:.3f}",
         f"FP32 precision, NCHW: ring-4 {slow['ring']:.1f} ms, fp32 {slow['fp32']:.1f} ms"),
        ("(b) interp memory soft", f"{r['interp_memory_ratio']:.2f}x",
         f"{mem['soft'] / mib:.1f} MiB extra for {mem['positions'] / mib:.0f} MiB of positions "
         f"({r['interp_layer']}, table prebuilt)"
         + ("" if r["peak_reset"] else "; peak mark not reset: upper bounds")),
        ("(b) ... table built inside", f"{r['interp_memory_ratio_with_table_build']:.2f}x",
         f"{mem['soft_cold'] / mib:.1f} MiB extra"),
        ("(b) interp memory naive", f"{r['naive_interp_memory_ratio']:.2f}x",
         f"{mem['naive'] / mib:.1f} MiB extra"),
        ("(c) data path speedup", f"{r['data_path_speedup']:.1f}x",
         f"memory {img['memory']:,.0f} img/s, torchvision {img['torchvision']:,.0f} img/s "
         f"({r['data_source']})"),
        ("(d) eval images/s", "", ", ".join(f"{k} {v:,.0f}" for k, v in ev.items())
         + f" (batch {r['eval_batch']})"),
        ("(e) epoch s, fast", f"{r['fast_epoch_s']:.1f}",
         f"ring-4 {epoch['fast']['ring']:.1f} s, fp32 {epoch['fast']['fp32']:.1f} s; FP32-NCHW: "
         f"ring-4 {epoch['fp32_nchw']['ring']:.1f} s, fp32 {epoch['fp32_nchw']['fp32']:.1f} s "
         f"({r['epoch_images']['train']:,} + {r['epoch_images']['val']:,} images, "
         f"{r['epoch_source']})"),
        ("(e) 200 epochs, fast", "", ", ".join(
            f"{n} {v:.0f} min" for n, v in r["projected_200_epoch_min"]["fast"].items())),
    ]
    lines = [f"{name:<26}{value:>9}  {detail}" for name, value, detail in rows]
    lines += [f"target {k} {c['target']}: {'met' if c['met'] else 'NOT met'}"
              for k, c in r["targets"].items()]
    return "\n".join(lines)


def run(args):
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or cfg["repeats"]
    results = {"quick": args.quick, "repeats": repeats, "environment": environment(device)}
    print(format_environment(results["environment"]) + (" (quick)" if args.quick else ""),
          flush=True)
    results.update(bench_train_step(device, cfg, repeats))
    results.update(bench_memory(device, cfg))
    results.update(bench_data(device, cfg, args.data_dir))
    results.update(bench_eval(device, cfg, repeats))
    results.update(bench_epoch(device, cfg, args.data_dir))
    results["targets"] = target_checks(results)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if (args.repeats is not None and args.repeats < 1) or (args.threads is not None
                                                           and args.threads < 1):
        raise SystemExit("--repeats and --threads must be >= 1")
    if args.memory_probe:
        side = args.probe_side or FULL["probe_side"]
        print(json.dumps(memory_probe(args.memory_probe, side, resolve_device(args.device))))
        return None
    return run(args)


if __name__ == "__main__":
    main()
