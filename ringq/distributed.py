"""Distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

One process per device; NCCL on CUDA, gloo on CPU. Without torchrun every
helper degrades to the single-process case.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import DataError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(device_type):
    """Start the process group when launched by torchrun; return DistInfo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank)


def cleanup(finished):
    """Tear the process group down; ``finished`` runs wait for every process first.

    Waiting matters: a gloo process that destroys its group while a peer is
    still working can abort ("terminate called without an active exception").
    After a failure no barrier is attempted, since a peer may never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of floats over all processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def local_rank_first(dist_info, device, load):
    """``load()`` on every process, local rank 0 first (it alone downloads what is missing).

    The other processes wait in a collective until every local rank 0 has
    finished, then load what is now on disk. If a local rank 0 fails, it
    raises its own error and the others raise a DataError instead of waiting.
    """
    if not dist_info.enabled:
        return load()
    first = dist_info.local_rank == 0
    result, error = None, None
    if first:
        try:
            result = load()
        except Exception as e:  # re-raised below, once the others know
            error = e
    failed = all_reduce_sum([float(error is not None)], device)[0]
    if error is not None:
        raise error
    if failed:
        raise DataError(f"loading the data failed on {int(failed)} local rank 0 process(es); "
                        f"see their error")
    return result if first else load()


def all_reduce_tensor(t):
    """Sum tensor ``t`` over all processes in place and return it (``t`` when not distributed).

    Stays on the device: no host sync.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient is summed over processes too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def differentiable_all_reduce(x):
    """Sum of ``x`` over all processes, differentiable; ``x`` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return _AllReduceSum.apply(x)


def global_moments(x, dims):
    """Per-channel (mean, biased variance, count) of ``x`` over ``dims`` and all processes.

    Each process takes a two-pass ``var_mean`` of its share (float32, no
    cancellation); the shares are merged as float64 sums of n, n*m and
    n*(v + m^2), so the result matches one process's statistics of the global
    batch to float32 precision, even when |mean| >> std. Differentiable; the
    count is a float64 0-dim tensor (no host sync).
    """
    count = x.numel() // x.shape[1]
    if count:
        var, mean = torch.var_mean(x, dims, correction=0)
        mean, var = mean.double(), var.double()
    else:  # an empty share: zeros still tied to x, so every rank joins the backward collective
        var = mean = x.sum(dims, dtype=torch.float64)
    n = torch.full_like(mean, count)
    sums = differentiable_all_reduce(torch.stack([n, n * mean, n * (var + mean * mean)]))
    total = sums[0]
    mean = sums[1] / total
    var = (sums[2] / total - mean * mean).clamp(min=0)
    return mean.float(), var.float(), total[0]


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span all processes (any backend, gloo too).

    Statistics come from :func:`global_moments` through a differentiable
    collective, so a K-process run normalises, and back-propagates, as one
    process would on the global batch. Used for BatchNorm1d and BatchNorm2d
    alike (statistics per channel, dim 1). Eval mode uses the running
    statistics, as plain BatchNorm does.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.float()
        mean, var, count = global_moments(xf, [0] + list(range(2, x.dim())))
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        """Running mean / unbiased variance, with BatchNorm's momentum (None: cumulative)."""
        self.num_batches_tracked += 1
        factor = self.momentum
        if factor is None:
            factor = 1.0 / self.num_batches_tracked.item()
        unbiased = var * (count / (count - 1).clamp(min=1)).float()
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased, factor)


def convert_batchnorm(module):
    """Replace every BatchNorm1d/2d of ``module`` by a :class:`GlobalBatchNorm`, in place.

    The new layers adopt the old ones' parameter and buffer tensors themselves
    (not copies), so an optimizer built before the conversion still updates
    them, and state-dict keys are unchanged, so checkpoints stay
    interchangeable with single-process runs.
    """
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(module, name, _global_twin(child))
        else:
            convert_batchnorm(child)
    return module


def _global_twin(bn):
    """A GlobalBatchNorm sharing ``bn``'s settings, parameters and buffers."""
    new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                          bn.track_running_stats)
    for key, param in bn.named_parameters(recurse=False):
        setattr(new, key, param)
    for key, buf in bn.named_buffers(recurse=False):
        setattr(new, key, buf)
    return new.train(bn.training)


def unwrap(model):
    """The plain model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)

