"""Write a small data folder of image files, as a user with few labels has one:

    OUT/train/<class>/*.png     a few labelled images per class
    OUT/unlabelled/*.png        images without labels (names do not tell the class)
    OUT/test/<class>/*.png      labelled test images
    OUT/unlabelled-labels.csv   the hidden classes of unlabelled/ (outside it, for checking
                                suggestions only; training never reads it)

from a built-in data set (digits, fashion-mnist, or the CIFAR-10 archive), by a seeded
draw. PNG keeps the pixels exactly. mbdml recognises the layout by itself:

    python examples/make_image_folder.py --dataset cifar10 --out my_photos
    mbdml train --dataset my_photos --method mbdml1_semi
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from mbdml.data import load_dataset


def save_png(image: np.ndarray, path: Path) -> None:
    """One (C, H, W) uint8 image as a PNG file (grey for one channel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


def per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices of each class (all of a smaller class), drawn at random."""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def write_folder(dataset: str, out: Path, labelled_per_class: int, unlabelled: int, test_per_class: int, seed: int) -> dict[str, int]:
    """Write the folder; returns how many images went to each part."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; pass a new --out folder")
    train, test = load_dataset(dataset)
    rng = np.random.default_rng(seed)
    y, images = train.labels.numpy(), train.images.numpy()
    labelled = per_class(y, labelled_per_class, rng)
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    pool = np.sort(rng.permutation(rest)[:unlabelled])
    for i in labelled:
        save_png(images[i], out / "train" / train.classes[y[i]] / f"{i:06d}.png")
    with open(out / "unlabelled-labels.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["file", "class"])
        for k, i in enumerate(pool):
            name = f"u{k:06d}.png"
            save_png(images[i], out / "unlabelled" / name)
            rows.writerow([f"unlabelled/{name}", train.classes[y[i]]])
    ty, timages = test.labels.numpy(), test.images.numpy()
    chosen_test = per_class(ty, test_per_class, rng)
    for i in chosen_test:
        save_png(timages[i], out / "test" / test.classes[ty[i]] / f"{i:06d}.png")
    return {"train": len(labelled), "unlabelled": len(pool), "test": len(chosen_test)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", help="digits, fashion-mnist or cifar10 (default cifar10)")
    p.add_argument("--out", required=True, help="a new folder")
    p.add_argument("--labelled_per_class", type=int, default=50, help="labelled training images per class (default 50)")
    p.add_argument("--unlabelled", type=int, default=5000, help="unlabelled images (default 5000)")
    p.add_argument("--test_per_class", type=int, default=100, help="test images per class (default 100)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    counts = write_folder(args.dataset, Path(args.out), args.labelled_per_class, args.unlabelled, args.test_per_class, args.seed)
    print(f"wrote {args.out}: {counts['train']} labelled, {counts['unlabelled']} unlabelled, {counts['test']} test images")


if __name__ == "__main__":
    main()
