"""Which images go into which step: a pure function of (seed, epoch, step), so resumes are exact.

The order of an epoch is a seeded permutation of the (repeated) training images, padded by wrapping
around to a whole number of optimizer steps, so every step has the same global batch and

    steps per epoch = ceil(images x repeats / (batch x accumulation x processes)).

Process r of P takes rows [r*B, (r+1)*B) of each global micro-batch of B*P images, so P processes
with batch B see exactly the images one process with batch P*B sees. Random draws of a step (latent
sample, noise, timesteps, flips) come from a generator seeded by (seed, step, micro-step) for the
whole global batch, sliced the same way: a step's randomness does not depend on the process layout
or on anything that happened before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


def steps_per_epoch(n_images: int, repeats: int, batch_size: int, accumulation: int, processes: int) -> int:
    if n_images < 1:
        raise ValueError("no training images")
    return math.ceil(n_images * repeats / (batch_size * accumulation * processes))


def total_steps(n_images: int, repeats: int, batch_size: int, accumulation: int, processes: int,
                epochs: int, max_steps: int | None) -> int:
    """`max_steps` when given, else epochs x steps per epoch (the number the progress bar shows)."""
    if max_steps is not None:
        return max_steps
    return epochs * steps_per_epoch(n_images, repeats, batch_size, accumulation, processes)


@dataclass(frozen=True)
class BatchPlan:
    n_images: int
    repeats: int
    batch_size: int
    accumulation: int
    processes: int
    seed: int
    n_class: int = 0
    """Class (prior-preservation) images; each instance slot is paired with one of them."""

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n_images, self.repeats, self.batch_size, self.accumulation, self.processes)

    @property
    def global_micro_batch(self) -> int:
        return self.batch_size * self.processes

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def epoch_order(self, epoch: int) -> list[int]:
        return _epoch_order(self.n_images, self.repeats, self.seed, epoch,
                            self.steps_per_epoch * self.global_micro_batch * self.accumulation)

    def global_indices(self, step: int, micro: int) -> list[int]:
        """Image indices of micro-step `micro` of optimizer step `step`, all processes together."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = (within * self.accumulation + micro) * self.global_micro_batch
        return self.epoch_order(epoch)[start:start + self.global_micro_batch]

    def class_indices(self, step: int, micro: int) -> list[int]:
        if not self.n_class:
            return []
        start = (step * self.accumulation + micro) * self.global_micro_batch
        return [(start + j) % self.n_class for j in range(self.global_micro_batch)]

    def rows(self, rank: int) -> slice:
        return slice(rank * self.batch_size, (rank + 1) * self.batch_size)


@lru_cache(maxsize=4)
def _epoch_order(n_images: int, repeats: int, seed: int, epoch: int, padded: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = [i % n_images for i in torch.randperm(n_images * repeats, generator=generator).tolist()]
    return (order * math.ceil(padded / len(order)))[:padded]


def step_generator(seed: int, step: int, micro: int, device: Any):
    """The generator of one micro-step's random draws (see module docstring)."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1))
    return generator


class ImageLoader:
    """Map-style dataset: global micro-batch number -> pixel tensors of this process's rows.

    Wrapped in a torch DataLoader (batch_size=None) so `num_workers` processes decode images ahead
    of the step; with cached latents nothing is decoded at all.
    """

    def __init__(self, plan: BatchPlan, sources: list[Any], class_sources: list[Any], rank: int,
                 resolution: int, resize: str, start_step: int, total: int, load_pixels: bool):
        self.plan, self.sources, self.class_sources = plan, sources, class_sources
        self.rank, self.resolution, self.resize = rank, resolution, resize
        self.start, self.total, self.load_pixels = start_step, total, load_pixels

    def __len__(self) -> int:
        return (self.total - self.start) * self.plan.accumulation

    def _pixels(self, sources: list[Any], indices: list[int]):
        import torch

        from synthcxr.data.preprocess import load_image, to_model_tensor

        return torch.stack([to_model_tensor(load_image(sources[i], self.resolution, self.resize)) for i in indices])

    def __getitem__(self, k: int) -> dict[str, Any]:
        step, micro = divmod(self.start * self.plan.accumulation + k, self.plan.accumulation)
        rows = self.plan.rows(self.rank)
        item: dict[str, Any] = {"step": step, "micro": micro,
                                "indices": self.plan.global_indices(step, micro)[rows],
                                "class_indices": self.plan.class_indices(step, micro)[rows]}
        if self.load_pixels:
            item["pixels"] = self._pixels(self.sources, item["indices"])
            if item["class_indices"]:
                item["class_pixels"] = self._pixels(self.class_sources, item["class_indices"])
        return item
