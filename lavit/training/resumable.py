"""Exact resume at any step: a training loader that remembers where it is, and the RNG states.

A checkpoint saved mid-epoch (SIGTERM, ``every_n_train_steps``) resumes with bit-identical
results on CPU with ``num_workers=0``, because everything that draws random numbers continues
where it stopped:

* the data order: the training loader is torchdata's ``StatefulDataLoader`` (Lightning saves
  and restores its state itself) with torchdata's stateful ``RandomSampler``
  (:data:`ResumableShuffle`), which stores its generator and how many indices it handed out;
* the augmentations, Mixup/CutMix and drop path, which draw from the global torch, numpy and
  Python RNGs: :func:`rng_states` are stored in the checkpoint and put back
  (:func:`set_rng_states`) just before the resumed epoch fetches its next batch.

With worker processes (``num_workers > 0``) the order still resumes exactly, but each worker's
augmentation RNG is seeded anew when the workers start, so the augmentations of the rest of
that epoch differ from an uninterrupted run's.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader.sampler import RandomSampler as ResumableShuffle

__all__ = ["ResumableShuffle", "mid_epoch", "rng_states", "set_rng_states"]


def mid_epoch(trainer: Any) -> bool:
    """Whether a checkpoint saved now falls inside a training epoch (its resume continues that
    epoch; one saved at the epoch's end starts the next, with a new order and reseeded RNGs)."""
    if trainer is None or trainer.state.fn != "fit":
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return not progress.is_last_batch and progress.current.completed > 0


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
