"""Distributed runs under torchrun: process group, rank-0 output, gathers with gradients.

Single-process runs need none of this: every helper is the identity when no process group is
initialised, so the scripts run the same code with one process or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def env_world() -> DistInfo:
    """Rank and world size from torchrun's environment (1 process when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    """NCCL on CUDA, gloo on the CPU; the address comes from torchrun (no hard-coded host)."""
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=info.rank, world_size=info.world)


def is_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_on() else 1


def rank() -> int:
    return dist.get_rank() if is_on() else 0


def barrier() -> None:
    if is_on():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_on():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_objects(obj) -> list:
    if not is_on():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process's gradient and returns this process's slice.

    When every process computes the same loss on the gathered tensor, the slice gradient is
    world × ∂loss/∂(own slice); DistributedDataParallel then averages over processes, so the
    parameter gradient equals the single-process gradient of the global-batch loss
    (docs/differences.md #11: the original's gather left it divided by the world size).
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        ctx.sizes = [p.shape[0] for p in parts]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes in rank order (equal sizes), keeping gradients."""
    return _GatherWithGrad.apply(x) if is_on() else x


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes in rank order, without gradients (equal sizes)."""
    if not is_on():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def average_gradients(params) -> None:
    """Mean of each gradient over processes (for parameters trained outside the DDP wrapper)."""
    if not is_on():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ProcessGroupBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span every process, for CPU (gloo) runs:
    ``torch.nn.SyncBatchNorm`` needs CUDA. Same statistics, running-average update and
    gradients as one process seeing the whole batch."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and is_on()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = xf.new_tensor([x.numel() / c])
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c: 2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch norm over the global batch: SyncBatchNorm on CUDA, the gloo version on the CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        out = ProcessGroupBatchNorm(module.num_features, module.eps, module.momentum,
                                    module.affine, module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_bn(child, device))
    return out


def wrap(model: torch.nn.Module, device: torch.device, sync_bn: bool, log=None):
    """DistributedDataParallel (and global batch norm when ``sync_bn``) under torchrun."""
    if not is_on():
        return model
    if sync_bn:
        model = convert_sync_bn(model, device)
        if log:
            log("Turn on synchronized batch normalization across processes.")
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                     broadcast_buffers=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
