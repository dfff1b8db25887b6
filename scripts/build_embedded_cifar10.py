"""Build the class-balanced CIFAR-10 subset that ships inside the package.

The subset is the ``"embedded"`` default of ``lavit.training.data.ImageDataModule``: it lets
training, the tests and the tools run offline with no dataset download. This maintainer script
reads the full CIFAR-10 parquet files (Hugging Face ``Image`` + ``ClassLabel`` layout), keeps
``--train-per-class`` / ``--test-per-class`` rows of every class chosen with a fixed seed, and
writes them, with their original encoded image bytes and the ``ClassLabel`` names, to
``lavit/assets/cifar10_subset/{train,test}.parquet``.

Usage::

    python scripts/build_embedded_cifar10.py --source-dir /path/to/cifar10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "lavit" / "assets" / "cifar10_subset"
DEFAULT_SOURCE_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"


def balanced_subset_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Return ``per_class`` row indices of every class, chosen at random and then shuffled.

    The final shuffle mixes the classes so that the first rows of the file are not all one class.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"class {label} has only {len(members)} rows, fewer than {per_class}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return rng.permutation(np.concatenate(chosen))


def build_split(source: Path, destination: Path, per_class: int, seed: int) -> int:
    """Write a balanced subset of the parquet file ``source`` to ``destination``; return its size."""
    # Reading with pyarrow keeps the image column as the original encoded bytes (no decoding) and
    # the schema metadata that carries the Hugging Face features (ClassLabel names).
    table = pq.read_table(source)
    rows = datasets.Dataset(table)
    if not isinstance(rows.features.get("label"), datasets.ClassLabel):
        raise ValueError(f"{source} has no ClassLabel column 'label': {rows.features}")
    indices = balanced_subset_indices(np.asarray(table.column("label")), per_class, seed)
    subset = rows.select(indices)
    destination.parent.mkdir(parents=True, exist_ok=True)
    subset.to_parquet(str(destination))
    return len(subset)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=DEFAULT_SOURCE_DIR,
        help="folder with the full CIFAR-10 train.parquet and test.parquet",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        source = args.source_dir / f"{split}.parquet"
        if not source.is_file():
            raise SystemExit(f"missing {source}: pass --source-dir with the full CIFAR-10 parquet")
        destination = args.out_dir / f"{split}.parquet"
        # A different seed per split keeps the two draws independent.
        count = build_split(source, destination, per_class, seed=args.seed + (split == "test"))
        size_mb = destination.stat().st_size / 1e6
        print(
            f"{split}: {count} images ({per_class} per class) -> {destination} ({size_mb:.2f} MB)"
        )


if __name__ == "__main__":
    main()
