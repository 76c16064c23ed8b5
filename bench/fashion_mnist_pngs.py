"""Write Fashion-MNIST out as an ImageFolder of PNG files: real images on disk for the streaming benchmark.

    python bench/fashion_mnist_pngs.py /tmp/fmnist-png            # ROOT/train/<class>/<index>.png, ROOT/test/...
    python bench/fashion_mnist_pngs.py /tmp/fmnist-png --data fashion-mnist:PATH

Reads the IDX files (Debian's dataset-fashion-mnist by default) through eetool's own loader; the file name is
the sample's index in its split, zero-padded so that the folder's sorted order is the IDX order.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from eetool.core.datasets import load_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--data", default="fashion-mnist")
    args = ap.parse_args()
    start = time.perf_counter()
    written = {}
    for split in ("train", "test"):
        ds = load_dataset(args.data, split)
        assert ds.images is not None
        folders = [args.root / split / f"{k:02d}-{name.replace('/', '-')}" for k, name in enumerate(ds.classes)]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(ds.images[:, 0].numpy(), ds.labels.tolist(), strict=True)):
            Image.fromarray(image, "L").save(folders[label] / f"{i:05d}.png")
        written[split] = len(ds)
    print(json.dumps({"root": str(args.root), "images": written, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
