"""What the layer-wise loop needs from torch.distributed, with a single-process stand-in."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# Test hook: "RANK:LAYER" makes that rank raise when it reaches that layer, "RANK:LAYER:kill"
# makes it die by SIGKILL there (a crashed worker). Used by the fault tests only.
FAIL_ENV = "QUANTKIT_FAIL_AT"
# Test hook: seconds to sleep at the start of every layer, so a test can kill a run mid-way.
DELAY_ENV = "QUANTKIT_LAYER_DELAY"
# Test hook: "1" splits every linear's output rows over all ranks (instead of the cost-balanced
# plan, which splits only where that balances better), so tests exercise the row-split path.
SPLIT_ENV = "QUANTKIT_SPLIT_ROWS"


class Comm:
    """One process, no communication: rank 0 of 1 (the plain single-process path)."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, on_layer: Callable[[int], None] | None = None) -> None:
        self.on_layer = on_layer

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

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (on every rank)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def enter_layer(self, index: int) -> None:
        """Record progress (for error messages) and fire the fault-injection hook."""
        if self.on_layer is not None:
            self.on_layer(index)
        if os.environ.get(DELAY_ENV):
            import time

            time.sleep(float(os.environ[DELAY_ENV]))
        spec = os.environ.get(FAIL_ENV)
        if not spec:
            return
        parts = spec.split(":")
        if int(parts[0]) == self.rank and int(parts[1]) == index:
            if len(parts) > 2 and parts[2] == "kill":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure ({FAIL_ENV}={spec})")


class TorchComm(Comm):
    """An initialised torch.distributed process group; tensors travel on `device`."""

    def __init__(self, device: torch.device | str, on_layer: Callable[[int], None] | None = None) -> None:
        import torch.distributed as dist

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

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (on every rank)."""
        out: list[object] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        self._dist.barrier()
