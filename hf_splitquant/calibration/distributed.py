"""Several processes: the Accelerator, which process optimises which layer, and broadcasting results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..methods import get_format

__all__ = ["broadcast", "gather", "make_accelerator", "assign_owners"]


def broadcast(payload: Any, owner: int, accelerator: Any) -> Any:
    """``payload`` from process ``owner`` on every process (itself with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return payload
    from accelerate.utils import broadcast_object_list

    box = [payload]
    broadcast_object_list(box, from_process=owner)
    return box[0]


def gather(payload: Any, accelerator: Any) -> list[Any]:
    """Every process's ``payload``, in process order, on every process (``[payload]`` with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [payload]
    from accelerate.utils import gather_object

    return gather_object([payload])


def make_accelerator(device: torch.device) -> Any:
    """An Accelerator for the model's device (on CPU ``cpu=True``, which makes torchrun processes use gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(cpu=device.type == "cpu", dataloader_config=DataLoaderConfiguration(even_batches=False))


def assign_owners(names: Sequence[str], specs: Mapping[str, Any], world: int) -> dict[str, int]:
    """Process of each layer: largest first, each to the least loaded process (cost ~ out * cols^2, the
    per-iteration product of Attention Round), deterministically."""
    def cost(name: str) -> int:
        spec = specs[name]
        cols = get_format(spec).columns(spec)
        return spec.out_features * cols * (cols + 64)

    load = [0] * world
    owners = {}
    for name in sorted(names, key=lambda n: (-cost(n), names.index(n))):
        owner = min(range(world), key=lambda p: (load[p], p))
        owners[name] = owner
        load[owner] += cost(name)
    return owners


