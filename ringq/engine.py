"""Training and evaluation loops."""
import math
import signal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from models.utils import (clamp_positions, ring_layers, set_sigma, set_weight_mode, uniform_layers,
                          weight_mode)

from .distributed import all_reduce_sum, all_reduce_tensor, unwrap
from .errors import RingqError
from .precision import autocast, strict_fp32
from .runtime import EXIT_INTERRUPTED


class NonFiniteError(RingqError):
    """A non-finite loss or gradient under ``--nan-policy stop``."""

    exit_code = 3


class Interrupted(RingqError):
    """SIGINT or SIGTERM arrived; the run stops at the end of the current step."""

    exit_code = EXIT_INTERRUPTED


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a flag checked between steps.

    A second signal stops at once (Interrupted raised from the handler).
    """

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            raise Interrupted(f"second signal ({name}) received; stopped at once")
        self.received = name

    def requested(self, device):
        """True on every process once any process has received a signal."""
        return all_reduce_sum([float(self.received is not None)], device)[0] > 0

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def to_layout(x, channels_last):
    """``x`` in channels-last memory format when asked and 4-D (images), else unchanged."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def lr_at(cfg, epoch):
    """Learning rate of 1-based ``epoch``: ``lr`` times ``gamma`` per milestone passed.

    A pure function of the config (as MultiStepLR stepped once per epoch), so a
    resumed run follows the schedule it records.
    """
    return cfg["lr"] * cfg["gamma"] ** sum(m < epoch for m in cfg["schedule"])


def sigma_at(cfg, base_sigma, epoch):
    """Kernel width for 1-based ``epoch``: geometric anneal base -> sigma_final, else base."""
    final = cfg.get("sigma_final")
    if final is None or cfg["epochs"] == 1:
        return base_sigma if final is None else final
    t = (epoch - 1) / (cfg["epochs"] - 1)
    return base_sigma * (final / base_sigma) ** t


def train_mode_at(cfg, epoch):
    """``ste`` during the last ``ste_epochs`` epochs, else ``soft``."""
    return "ste" if epoch > cfg["epochs"] - cfg["ste_epochs"] else "soft"


def apply_epoch_schedule(model, cfg, base_sigma, epoch):
    """Set sigma and the training weight mode of every ring layer for ``epoch``."""
    if ring_layers(model):
        set_sigma(model, sigma_at(cfg, base_sigma, epoch))
        set_weight_mode(model, train_mode_at(cfg, epoch))


def param_groups(model, cfg):
    """SGD groups of the training scripts (and :class:`ringq.Recipe`): the non-position
    parameters (LSQ steps, output scales and biases among them), then ring positions.

    Positions take ``position_weight_decay`` (None: ``weight_decay``) and ``lr *
    position_lr_scale``; with ``position_lr_fan_in`` each ring layer is its own group
    whose scale is further multiplied by the layer's fan-in. ``lr_scale`` is kept in
    each group. cfg keys: weight_decay, position_weight_decay, position_lr_scale,
    position_lr_fan_in.
    """
    layers = [layer for _, layer in ring_layers(model)]
    positions = {id(layer.positions) for layer in layers}
    others = [p for p in model.parameters() if id(p) not in positions]
    groups = [{"params": others, "weight_decay": cfg["weight_decay"], "lr_scale": 1.0}]
    wd_pos = cfg["weight_decay"] if cfg["position_weight_decay"] is None \
        else cfg["position_weight_decay"]
    if cfg["position_lr_fan_in"]:
        groups += [{"params": [layer.positions], "weight_decay": wd_pos,
                    "lr_scale": cfg["position_lr_scale"] * layer.fan_in} for layer in layers]
    elif layers:
        groups.append({"params": [layer.positions for layer in layers], "weight_decay": wd_pos,
                       "lr_scale": cfg["position_lr_scale"]})
    return groups


def distillation_loss_sum(logits, y, teacher_logits, weight, temperature):
    """Summed loss of a batch learning from a teacher (logits, teacher_logits [B, classes],
    labels y [B]): (1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T),
    both softened by the temperature T; weight 0 gives the cross-entropy exactly."""
    ce = F.cross_entropy(logits, y, reduction="sum")
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                  F.log_softmax(teacher_logits / temperature, dim=1), reduction="sum",
                  log_target=True)
    return (1 - weight) * ce + weight * temperature ** 2 * kl


def _forward_backward(model, params, x, y, optimizer, cfg, precision, max_norm, scale,
                      teacher=None):
    """Gradients of one batch: (logits, summed loss of this share, finite flag), all on the device.

    The summed loss is multiplied by ``scale`` = processes / global batch size,
    so that, after DDP averages gradients over the processes, they are those of
    the mean loss over the global batch, also when the processes hold unequal
    (or empty) shares of a final partial batch. The finite flag (bool, 0-dim)
    is True when the loss and the gradient norm are finite; nothing is read
    back to the host here. With a ``teacher`` (a frozen model in eval mode, run without
    gradients in the same precision) the loss is :func:`distillation_loss_sum`.
    """
    x = to_layout(x, cfg["channels_last"])
    with autocast(x.device, precision):
        logits = model(x)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
    if teacher is None:
        loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
    else:
        loss_sum = distillation_loss_sum(logits.float(), y, teacher_logits.float(),
                                         cfg["distill_weight"], cfg["distill_temperature"])
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * scale).backward()
    grad_norm = nn.utils.clip_grad_norm_(params, max_norm)
    return logits.detach(), loss_sum.detach(), torch.isfinite(loss_sum) & torch.isfinite(grad_norm)


@torch.no_grad()
def _undo_forward(model, optimizer, buffers):
    """Drop a skipped step's gradients and restore the buffers (BatchNorm statistics)."""
    optimizer.zero_grad(set_to_none=True)
    for b, saved in zip(model.buffers(), buffers):
        b.copy_(saved)


def train_one_epoch(model, loader, optimizer, cfg, epoch, device, stop=None, progress=True,
                    precision="fp32", teacher=None):
    """One pass over ``loader``; returns {"loss", "accuracy", "skipped_steps"} (global).

    ``precision``: ``fp32`` or ``bf16`` (autocast of forward and backward). ``teacher``:
    a frozen model to distil from (``cfg`` distill_weight, distill_temperature).
    After each step positions are clamped to [0, 1]. A non-finite loss or
    gradient norm stops the run (NonFiniteError) or, under ``nan_policy``
    skip-step, leaves weights and buffers as they were before the step. A
    signal caught by ``stop`` raises Interrupted after the step. Both checks
    agree across processes. Each step reads the device once (loss, correct
    count, finite flag and, under DDP, the signal flag, summed over processes
    in one collective); the global batch sizes come from the loader. Loss and
    accuracy are NaN if every step was skipped.
    """
    model.train()
    plain = unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg["clip_grad"] if cfg["clip_grad"] > 0 else math.inf
    skip = cfg["nan_policy"] == "skip-step"
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    flags = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)  # no copy per step
    loss_sum = correct = count = skipped = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False,
               dynamic_ncols=True)
    for step, ((x, y), global_size) in enumerate(zip(bar, loader.global_batch_sizes()), 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        buffers = [b.clone() for b in plain.buffers()] if skip else None
        logits, batch_loss, finite = _forward_backward(model, params, x, y, optimizer, cfg,
                                                       precision, max_norm, world / global_size,
                                                       teacher)
        stats = [batch_loss.double(), (logits.argmax(1) == y).sum().double(),
                 (~finite).double()]
        received = stop is not None and stop.received is not None
        if distributed:
            stats.append(flags[int(received)])
        stats = all_reduce_tensor(torch.stack(stats)).tolist()
        bad, signalled = stats[2] > 0, stats[3] > 0 if distributed else received
        if bad and not skip:
            raise NonFiniteError(f"non-finite loss or gradient at epoch {epoch}, step {step} "
                                 f"(loss {stats[0] / global_size:.4g}); stopped (lower --lr, or "
                                 f"pass --nan-policy skip-step to skip such steps)")
        if bad:
            skipped += 1
            _undo_forward(plain, optimizer, buffers)
        else:
            optimizer.step()
            clamp_positions(plain)
            loss_sum += stats[0]
            correct += stats[1]
            count += global_size
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{100 * correct / count:.2f}",
                            refresh=False)
        if signalled:
            raise Interrupted(f"{stop.received or 'a signal'} received at epoch {epoch}, "
                              f"step {step}")
    return {"loss": loss_sum / count if count else math.nan,
            "accuracy": 100.0 * correct / count if count else math.nan,
            "skipped_steps": int(skipped)}


@torch.no_grad()
def evaluate(model, loader, device, mode=None, channels_last=False, progress=False,
             desc="eval"):
    """Mean loss and accuracy (percent) of ``model`` over ``loader``, computed in FP32 (no
    autocast, no TF32).

    mode: ``soft``, ``hard`` or None (FP32 model / keep the current mode).
    Quantized weights are computed once for the pass (cached while the latent tensors
    stay unchanged). Sums stay on the device until the end; results are summed over
    processes.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    with weight_mode(unwrap(model), mode), strict_fp32():
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            if y.numel() == 0:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(to_layout(x, channels_last)).float()
            totals[0] += F.cross_entropy(logits, y, reduction="sum")
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += y.numel()
    loss_sum, correct, count = all_reduce_tensor(totals).tolist()
    return {"loss": loss_sum / max(count, 1), "accuracy": 100.0 * correct / max(count, 1),
            "num_examples": int(count)}


@torch.no_grad()
def recalibrate_batchnorm(model, loader, num_images, mode="hard"):
    """Re-estimate BatchNorm running statistics from ``num_images`` unlabelled images.

    Weights are put in ``mode`` (hard: what a k-bit network computes); running
    statistics are reset and re-accumulated as an exact average over the
    batches seen. Labels are ignored. Returns the number of images used.
    """
    plain = unwrap(model)
    device = next(plain.parameters()).device
    norms = [m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    plain.train()
    seen = 0
    try:
        with weight_mode(plain, mode):
            for x, _ in loader:
                if seen >= num_images:
                    break
                x = x[: num_images - seen].to(device, non_blocking=True)
                plain(x)
                seen += x.shape[0]
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        plain.eval()
    return seen


def eval_modes(model):
    """Weight modes in which a model is reported: soft and hard for ring models, hard for
    uniform K-bit ones (their one accuracy, under hard mode's key), else fp32."""
    plain = unwrap(model)
    return ("soft", "hard") if ring_layers(plain) else ("hard",) if uniform_layers(plain) \
        else ("fp32",)


def evaluate_all_modes(model, loader, device, channels_last=False, progress=False):
    """{mode: evaluate(...)} for every mode of :func:`eval_modes`."""
    return {mode: evaluate(model, loader, device, None if mode == "fp32" else mode,
                           channels_last, progress, desc=f"eval {mode}")
            for mode in eval_modes(model)}
