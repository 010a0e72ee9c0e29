"""What the layer-wise loop needs from torch.distributed, with a single-process stand-in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Hooks:
    """What tests change in a run, carried to every rank (picklable): a callable run as each rank enters
    each layer, `on_layer(rank, layer)` (to raise, kill or delay there), one that sees every Hessian handed
    to a solver, and the row-split plan."""

    on_layer: Callable[[int, int], None] | None = None
    # on_hessian(full_linear_name, normalised_hessian, normalised_cross_term or None): every Hessian (and the FP
    # target's cross term) a solver is given, on the rank that solves it
    on_hessian: Callable[[str, torch.Tensor, torch.Tensor | None], None] | None = None
    # every linear's output rows cut over all ranks, instead of the cost-balanced plan that cuts only
    # where that balances better, so tests exercise the row-split path
    split_rows: bool = False


class Comm:
    """One process, no communication: rank 0 of 1 (the plain single-process path)."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, on_layer: Callable[[int], None] | None = None, hooks: Hooks | None = None) -> None:
        self.on_layer = on_layer
        self.hooks = hooks or Hooks()

    @property
    def distributed(self) -> bool:
        """Whether there is more than this process."""
        return self.world_size > 1

    def reduce_sum_(self, tensor: torch.Tensor, dst: int) -> None:
        """Sum `tensor` over ranks into rank `dst`'s copy (in place)."""

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite `tensor` on every rank with rank `src`'s copy."""

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over ranks into every rank's copy (in place)."""

    def all_reduce_max_(self, tensor: torch.Tensor) -> None:
        """Elementwise max of `tensor` over ranks into every rank's copy (in place)."""

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (on every rank)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def enter_layer(self, index: int) -> None:
        """Record progress (for error messages) and run the hooks' on_layer."""
        if self.on_layer is not None:
            self.on_layer(index)
        if self.hooks.on_layer is not None:
            self.hooks.on_layer(self.rank, index)


class TorchComm(Comm):
    """An initialised torch.distributed process group; tensors travel on `device`."""

    def __init__(self, device: torch.device | str, on_layer: Callable[[int], None] | None = None) -> None:
        super().__init__(on_layer)
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)

    def _run(self, tensor: torch.Tensor, op: Callable[[torch.Tensor], None]) -> None:
        if tensor.device == self.device:
            op(tensor)
            return
        moved = tensor.to(self.device)
        op(moved)
        tensor.copy_(moved)

    def reduce_sum_(self, tensor: torch.Tensor, dst: int) -> None:
        """Sum `tensor` over ranks into rank `dst`'s copy (in place)."""
        self._run(tensor, lambda t: self._dist.reduce(t, dst=dst, op=self._dist.ReduceOp.SUM))

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite `tensor` on every rank with rank `src`'s copy."""
        self._run(tensor, lambda t: self._dist.broadcast(t, src=src))

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over ranks into every rank's copy (in place)."""
        self._run(tensor, lambda t: self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM))

    def all_reduce_max_(self, tensor: torch.Tensor) -> None:
        """Elementwise max of `tensor` over ranks into every rank's copy (in place)."""
        self._run(tensor, lambda t: self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX))

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (on every rank)."""
        out: list[object] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        self._dist.barrier()
