"""Build the offline dense demo set (detection + segmentation) from the embedded CIFAR-10 images.

The data modules build it on first use (``source: demo``); this script builds it ahead of time or
somewhere else, e.g. to look at it::

    python scripts/build_dense_demo.py                       # ~/.cache/lavit/dense_demo_v<N>
    python scripts/build_dense_demo.py --root /tmp/demo --train 100 --val 20
"""

from __future__ import annotations

import argparse

from lavit.dense.demo import DEFAULT_SIZES, build_dense_demo, dense_demo_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="output folder (default: the data modules' cache)")
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"], help="train canvases")
    parser.add_argument("--val", type=int, default=DEFAULT_SIZES["val"], help="val canvases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = build_dense_demo(
        args.root or dense_demo_dir(), {"train": args.train, "val": args.val}, seed=args.seed
    )
    print(root)


if __name__ == "__main__":
    main()
