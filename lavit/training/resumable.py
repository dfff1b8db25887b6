"""Exact resume at any step: a training loader that remembers where it is, and the RNG states.

A checkpoint saved mid-epoch resumes bit-identically (CPU, ``num_workers=0``): the training
loader is torchdata's ``StatefulDataLoader`` (Lightning saves its state) over
:class:`ResumableShuffle`, and the global torch, numpy and Python RNGs (augmentations,
Mixup/CutMix, drop path) are stored (:func:`rng_states`) and put back (:func:`set_rng_states`)
just before the resumed epoch fetches its next batch. With worker processes the order still
resumes exactly, but each worker's augmentation RNG is seeded anew.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ResumableShuffle", "mid_epoch", "rng_states", "set_rng_states"]


def mid_epoch(trainer: Any) -> bool:
    """Whether a checkpoint saved now falls inside a training epoch (its resume continues that
    epoch; one saved at the epoch's end starts the next, with a new order and reseeded RNGs)."""
    if trainer is None or trainer.state.fn != "fit":
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return not progress.is_last_batch and progress.current.completed > 0


# torchdata's stateful RandomSampler seeds once when built, so a resume from an epoch's end
# shuffles anew (tests/test_module.py::test_resume_gives_the_same_weights...): hence this one.
class ResumableShuffle(Sampler[int]):
    """A random permutation per epoch, like ``RandomSampler``, that resumes where it stopped.

    Like ``RandomSampler`` it draws a seed from the global RNG when an epoch's iteration starts;
    its state is that seed and how many indices it has handed out.
    """

    def __init__(self, data_source: Sized) -> None:
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        return _ResumableShuffleIterator(len(self.data_source))


class _ResumableShuffleIterator(Iterator[int]):
    def __init__(self, size: int) -> None:
        self.size = size
        self.seed: int | None = None
        self.yielded = 0
        self._order: list[int] | None = None

    def __next__(self) -> int:
        if self._order is None:
            if self.seed is None:  # what RandomSampler draws when an epoch's iteration starts
                self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator()
            generator.manual_seed(self.seed)
            self._order = torch.randperm(self.size, generator=generator).tolist()
        if self.yielded >= self.size:
            raise StopIteration
        index = self._order[self.yielded]
        self.yielded += 1
        return index

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["yielded"] >= self.size:  # saved at the epoch's end: the next epoch starts anew
            state = {"seed": None, "yielded": 0}
        self.seed, self.yielded, self._order = state["seed"], state["yielded"], None


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, Python) as checkpoint-safe values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": [list(part) if isinstance(part, tuple) else part for part in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
