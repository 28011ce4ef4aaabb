"""GPU actors for the passes that embed with a transformer, when the Ray cluster has GPUs.

``semantic_dedup``'s embedding pass and ``decontaminate`` ``method: semantic`` (each step's
`gpu` says whether its model gains from a GPU: a sentence-transformers model does, the static
model, a lookup table, does not) run on `GpuWorker` actors when the cluster reports GPUs: one
per GPU (``num_gpus=1``), started for the pass or step and killed at its end. Each loads the
model once, and Ray sets its ``CUDA_VISIBLE_DEVICES`` to its GPU, where sentence-transformers
puts the model when torch sees CUDA.

Actors, not tasks: Ray runs a task that asks for a GPU in a fresh process each time
(``max_calls=1``, so that the GPU is freed), which would load the model again for every block.
One actor per GPU, not a fraction: one copy of the model per GPU fits any model that fits the
GPU, and CUDA contexts of several processes on one GPU take turns rather than overlap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import ray

from kdata.executors.ray_executor import _await
from kdata.executors.ray_workers import RESTARTS, run_block
from kdata.steps.base import StepOutput

T = TypeVar("T")


def gpu_slots() -> int:
    """How many `GpuWorker` actors the cluster holds: per live node, its whole GPUs, at most
    one per CPU (each actor takes one of each). 0: the cluster has no GPU."""
    return sum(
        min(int(n["Resources"].get("GPU", 0)), int(n["Resources"].get("CPU", 0)))
        for n in ray.nodes()
        if n["Alive"]
    )


@ray.remote(num_cpus=1, num_gpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)
class GpuWorker:
    """A process holding one GPU: what the calls it runs load (the embedding model, cached per
    process) is loaded once per GPU."""

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, in this process."""
        return fn(*args)

    def device(self) -> tuple[str, list, str]:
        """(node id, the GPU ids Ray gave this actor, the device torch sees here: cuda or cpu)."""
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids(), device


class Gpus:
    """`GpuWorker` actors, one per GPU of the cluster (`gpu_slots`), for one pass or step;
    each call goes to the least busy actor. ``devices``: each actor's `GpuWorker.device`. A
    warning says when torch sees no CUDA device on an actor (it embeds on CPU there)."""

    async def __aenter__(self) -> Gpus:
        self.actors = [GpuWorker.remote() for _ in range(gpu_slots())]
        self.busy = [0] * len(self.actors)
        self.devices = await asyncio.gather(*(_await(a.device.remote()) for a in self.actors))
        on_cpu = [ids for _, ids, device in self.devices if device != "cuda"]
        if on_cpu:
            logging.getLogger(__name__).warning(
                "kdata: %d of %d GPU actors embed on CPU: Ray gave them GPUs %s, but torch sees "
                "no CUDA device there (a CPU-only torch, or no driver)",
                len(on_cpu),
                len(self.actors),
                on_cpu,
            )
        return self

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the least busy actor."""
        k = self.busy.index(min(self.busy))
        self.busy[k] += 1
        try:
            return await _await(self.actors[k].call.remote(fn, *args))
        finally:
            self.busy[k] -= 1

    async def run_block(self, step: list, setup: dict, rows: list[dict]) -> StepOutput:
        """A block of a map step, as `kdata.executors.ray_workers.map_block` runs it."""
        return await self.call(run_block, step, rows, setup)

    async def __aexit__(self, *exc: Any) -> None:
        for a in self.actors:
            ray.kill(a)
