"""Sharding the generator over ranks: FSDP2 (Lightning's ``ModelParallelStrategy``) and FSDP (``FSDPStrategy``).

Each class group lives on one rank (DESIGN.md), so only weights are distributed, never a group's field:
- the generator is sharded. Every element of an ``nn.ModuleList`` (the DiT blocks) is its own unit, so one block's
  weights are gathered at a time, and the rest of the generator forms the root unit;
- the EMA copy is kept whole on every rank and updated from the gathered generator weights after each step (one
  more all-gather per sharding unit and step), so sampling callbacks that run on rank 0 only, ``sample`` and
  export work as on one device;
- the frozen encoder (and the VAE, loaded outside the module) is replicated: no gradient reaches its weights.
DDP needs none of this: every rank holds the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor


def shard_units(generator: nn.Module) -> list[nn.Module]:
    """The generator's sharding units, every element of each ``nn.ModuleList`` and then the root, nested units
    before the units that contain them (``fully_shard`` goes bottom-up)."""
    modules = reversed(list(generator.modules()))
    blocks = [block for module in modules if isinstance(module, nn.ModuleList) for block in module]
    return [*blocks, generator]


def shard_fsdp2(generator: nn.Module, mesh: DeviceMesh) -> None:
    """``fully_shard`` the generator's units over the data-parallel dimension of ``mesh`` (the device mesh of
    ``ModelParallelStrategy``, dimensions ("data_parallel", "tensor_parallel")). A no-op if already sharded, since
    Lightning calls ``configure_model`` again for every fit/validate/test."""
    if isinstance(generator, FSDPModule):
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy has tensor_parallel_size={mesh['tensor_parallel'].size()}, but the generators "
            "have no tensor parallelism: every rank is a data-parallel rank. Set "
            f"--trainer.strategy.data_parallel_size={mesh.size()} --trainer.strategy.tensor_parallel_size=1 "
            "(number of nodes x devices per node, and 1)."
        )
    data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
    for unit in shard_units(generator):
        fully_shard(unit, mesh=data_parallel)


@contextmanager
def full_parameters(generator: nn.Module) -> Iterator[list[Tensor]]:
    """The generator's whole parameters, detached, in ``parameters()`` order, on every rank (a collective when the
    generator is sharded: every rank must enter). FSDP (``FSDPStrategy``) needs its default use_orig_params=True,
    which keeps the original parameters visible.

    FSDP2: one all-gather per sharding unit (``FSDPModule.unshard``, all units in flight at once), not one per
    parameter, and resharded on exit. The unshard gathers in the units' ``param_dtype``; when that is not the
    parameters' own dtype (a MixedPrecisionPolicy), the parameters are gathered one by one in their dtype instead."""
    if isinstance(generator, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(generator, writeback=False):
            yield [p.detach() for p in generator.parameters()]
        return
    units = [m for m in generator.modules() if isinstance(m, FSDPModule)]
    if units:
        dtypes = [p.dtype for p in generator.parameters()]
        handles = [unit.unshard(async_op=True) for unit in units]
        try:
            for handle in handles:
                if handle is not None:
                    handle.wait()
            params = [p.detach() for p in generator.parameters()]
            if not any(isinstance(p, DTensor) for p in params) and [p.dtype for p in params] == dtypes:
                yield params
                return
        finally:
            for unit in units:
                unit.reshard()
    yield [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in generator.parameters()]


def clip_fsdp_gradients(generator: nn.Module, max_norm: float) -> bool:
    """Clips by global norm through FSDP's own ``clip_grad_norm_`` when the generator is an FSDP (``FSDPStrategy``)
    root, where Lightning's norm clipping refuses to run; returns False (nothing done) otherwise."""
    if not isinstance(generator, FullyShardedDataParallel):
        return False
    generator.clip_grad_norm_(max_norm)
    return True


def wrap_fsdp(module: nn.Module, device: torch.device) -> nn.Module:
    """Under ``FSDPStrategy``: moves ``module`` (the LightningModule, whose EMA and encoder FSDP will not move) to
    ``device`` and returns its generator wrapped with the strategy's FSDP settings (``configure_model`` runs inside
    the strategy's ``enable_wrap`` context). Wrapping the generator alone keeps the EMA and encoder replicated."""
    from torch.distributed.fsdp.wrap import wrap

    if isinstance(module.generator, FullyShardedDataParallel):
        return module.generator
    module.to(device)
    return wrap(module.generator)
