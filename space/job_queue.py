"""Where queued trainings run: GPU slots, never two jobs on one GPU, and when a queued job starts.

Pure logic over numbers (no process, no torch), so that the assignment is tested with any GPU count.
`per_gpu` gives each GPU a job of its own (the child sees that GPU only, CUDA_VISIBLE_DEVICES);
`all_gpus` runs one job at a time across all of them (accelerate launch, one process per GPU).
A machine without a GPU has one slot: one training at a time, in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

GpuMode = Literal["per_gpu", "all_gpus"]


@dataclass(frozen=True)
class Slot:
    """Where one job runs: its GPUs (none on a CPU-only machine), one training process per GPU."""

    index: int
    gpus: tuple[int, ...] = ()

    @property
    def processes(self) -> int:
        return max(1, len(self.gpus))

    @property
    def shares_generation_gpu(self) -> bool:
        """Generation runs on the first GPU: a job there holds the app's gpu_lock. On a machine
        without a GPU, training and generation share the cores (and RAM, which does not run out the
        way a GPU's memory does), so a generation never waits for a training there."""
        return 0 in self.gpus


def gpu_slots(gpu_count: int, mode: GpuMode) -> list[Slot]:
    if mode not in ("per_gpu", "all_gpus"):
        raise ValueError(f"GPU mode must be 'per_gpu' or 'all_gpus', not {mode!r}")
    if gpu_count <= 0:
        return [Slot(0)]
    if mode == "all_gpus":
        return [Slot(0, tuple(range(gpu_count)))]
    return [Slot(i, (i,)) for i in range(gpu_count)]


class SlotPool:
    """The free slots; `take` hands out the first free one, so jobs fill GPU 0, 1, … in order."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)
        self._busy: set[int] = set()

    def take(self) -> Slot | None:
        slot = next((s for s in self.slots if s.index not in self._busy), None)
        if slot is not None:
            self._busy.add(slot.index)
        return slot

    def release(self, slot: Slot) -> None:
        self._busy.discard(slot.index)

    @property
    def free(self) -> int:
        return len(self.slots) - len(self._busy)


def start_estimates(
    running_eta: Sequence[float | None], free_slots: int, queued_steps: Sequence[int], seconds_per_step: float | None
) -> list[float | None]:
    """Seconds from now until each queued job (in FIFO order) starts; None where unknown.

    A busy slot frees up when its job's ETA runs out (unknown while it loads), a free one now; each
    queued job takes the slot that frees first and holds it for its steps × the last measured
    seconds per step. An unknown time makes every estimate after it unknown too.
    """
    free_at: list[float | None] = [0.0] * free_slots + list(running_eta)
    estimates: list[float | None] = []
    for steps in queued_steps:
        if not free_at or any(t is None for t in free_at):
            estimates.append(None)
            continue
        first = min(range(len(free_at)), key=lambda i: free_at[i])
        start = free_at[first]
        estimates.append(start)
        free_at[first] = None if seconds_per_step is None else start + steps * seconds_per_step
    return estimates
