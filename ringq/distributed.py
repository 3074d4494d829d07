"""Distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

One process per device; NCCL on CUDA, gloo on CPU. Without torchrun every
helper degrades to the single-process case.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


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


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, device):
    """Sum a list of floats over all processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag, device):
    """True on every rank if ``flag`` is true on any rank."""
    return all_reduce_sum([float(flag)], device)[0] > 0


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span all processes (any backend, gloo too).

    Sums and squared sums are all-reduced through a differentiable collective,
    so a K-process run normalises exactly as one process would on the global
    batch. Used for BatchNorm1d and BatchNorm2d alike (statistics per channel,
    dim 1). Eval mode uses the running statistics, as plain BatchNorm does.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        xf = x.float()
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce(stats)
        c = x.shape[1]
        total = stats[-1]
        mean = stats[:c] / total
        var = stats[c:2 * c] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * total / (total - 1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return (out * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


def convert_batchnorm(module):
    """Replace every BatchNorm1d/2d of ``module`` by a :class:`GlobalBatchNorm`, in place.

    State-dict keys are unchanged, so checkpoints stay interchangeable with
    single-process runs.
    """
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum,
                                  child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def unwrap(model):
    """The plain model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)

