"""Decoding image files into uint8 RGB arrays, safely and in bulk.

Shared by the folder loaders (:mod:`mbdml.data.image_folder`,
:mod:`mbdml.data.unlabelled`): the cap on pixels per image (checked from the
header, before decoding: a decompression bomb never reaches memory), the
conversion of every mode to RGB, the bad-image policy (``error`` names the file,
``skip`` leaves it out), decoding in a process pool when there are many files,
and assembling images of several sizes into one tensor.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbdml.errors import ConfigError, DataError

logger = logging.getLogger("mbdml")

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ON_BAD_IMAGE_CHOICES", "ImageTooLarge", "check_max_image_pixels"]

ON_BAD_IMAGE_CHOICES = ("error", "skip")
# Images larger than this (in pixels) are refused unless --max_image_pixels raises it: 100 megapixels
# (300 MB decoded), above any camera's picture, and well below what a decompression bomb asks for.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Below this many files decoding runs in this process: starting workers costs more.
_POOL_MIN_FILES = 2048
POOL_CHUNK = 1024  # files per task of the process pool

# Decoded groups: ((H, W), positions in the file list, stacked (n, H, W, 3) arrays).
Groups = list[tuple[tuple[int, int], np.ndarray, np.ndarray]]


class ImageTooLarge(ValueError):
    """An image has more pixels than the cap (a decompression bomb, or a huge picture)."""


# --------------------------------------------------------------------------- option checks


def normalise_ext(im_ext: str) -> str:
    """``im_ext`` lower-cased without dots: one extension, or several joined by commas ('jpg,png')."""
    exts = [e.strip().lower().lstrip(".") for e in str(im_ext).split(",")]
    if not all(exts) or any("/" in e or os.sep in e for e in exts):
        raise ConfigError(f"image extension {im_ext!r} is not valid; pass --im_ext like 'jpg', 'png' or 'jpg,jpeg,png'")
    return ",".join(dict.fromkeys(exts))


def ext_names(ext: str) -> str:
    """'.jpg', or '.jpg' or '.png', for messages."""
    return " or ".join(f"'.{e}'" for e in ext.split(","))


def check_on_bad_image(on_bad_image: str) -> None:
    """``on_bad_image`` is one of ``ON_BAD_IMAGE_CHOICES``."""
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
        raise ConfigError(
            f"on_bad_image={on_bad_image!r} is not known; pass --on-bad-image error or --on-bad-image skip"
        )


def check_max_image_pixels(max_pixels: int | None) -> None:
    """The cap on pixels per image: a whole number >= 1, or None for no cap."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ConfigError(
            f"max_image_pixels {max_pixels!r} is not a whole number >= 1; pass --max_image_pixels "
            f"{DEFAULT_MAX_IMAGE_PIXELS} (the default), a larger number, or none for no cap"
        )


def check_image_size(image_size: int | None) -> None:
    """A square side length >= 1, or None (keep the images' own size)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image size {image_size!r} is not a positive integer; pass --input_size 32, say")


# --------------------------------------------------------------------------- one file


def _open_image(path: str, max_pixels: int | None) -> Any:
    """PIL's lazy open (the header only), refusing more than ``max_pixels`` pixels before decoding.

    PIL's own check (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above twice
    that) is replaced by ours, so that the cap is the one the user chose.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ImageTooLarge(f"{w} x {h} = {w * h:,} pixels, more than the {max_pixels:,} of --max_image_pixels")
    return im


def decode_one(path: str, size: tuple[int, int] | None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one file to an RGB uint8 (H, W, 3) array, resized to ``size`` (H, W) when given;
    raises on any problem."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _open_image(path, max_pixels) as im:
            if im.mode == "RGB":
                im.load()
                rgb = im
            elif im.mode == "I" or im.mode.startswith("I;16"):
                # 16-bit grey (PIL would clip it to 255): keep the top 8 bits
                a = np.asarray(im).astype(np.int64)
                if im.mode != "I" or (a.size and a.max() > 255):
                    a = np.clip(a, 0, 65535) >> 8
                rgb = Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
            elif im.mode in ("P", "PA") or "transparency" in im.info:
                rgb = im.convert("RGBA").convert("RGB")
            else:
                rgb = im.convert("RGB")
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoded to an array of shape {arr.shape}, not (H, W, 3)")
    return arr


def _decode_chunk(
    task: tuple[list[int], list[str], tuple[int, int] | None, int | None],
) -> tuple[Groups, list[tuple[int, str]]]:
    """Worker: decode files, group the results by size (one stacked array per size)."""
    positions, paths, size, max_pixels = task
    groups: dict[tuple[int, int], tuple[list[int], list[np.ndarray]]] = {}
    bad: list[tuple[int, str]] = []
    for pos, path in zip(positions, paths):
        try:
            arr = decode_one(path, size, max_pixels)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            bad.append((pos, f"{type(exc).__name__}: {exc}"))
            continue
        key = (int(arr.shape[0]), int(arr.shape[1]))
        g = groups.setdefault(key, ([], []))
        g[0].append(pos)
        g[1].append(arr)
    out = [(k, np.asarray(p, dtype=np.int64), np.stack(a)) for k, (p, a) in groups.items()]
    return out, bad


# --------------------------------------------------------------------------- many files


def _worker_count(n_files: int, num_workers: int | None) -> int:
    if num_workers is not None:
        return max(0, int(num_workers))
    if n_files < _POOL_MIN_FILES:
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except AttributeError:
        cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else min(cpus, 8)


def _pool_context() -> Any:
    # fork starts workers in milliseconds and they only run PIL/numpy code, never torch;
    # where fork is missing (Windows, macOS default) spawn works too, just slower to start.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def bad_image_error(path: str, reason: str) -> DataError:
    """The error for an image file that cannot be read (or is over the pixel cap), with the fixes."""
    too_large = f"{ImageTooLarge.__name__}: "
    if reason.startswith(too_large):
        return DataError(
            f"image file '{path}' is {reason[len(too_large):]}: a decompression bomb, or a very large picture, "
            f"refused before decoding. If you trust it, raise the cap (--max_image_pixels N, or none for no cap), "
            f"or pass --on-bad-image skip to leave such files out"
        )
    return DataError(
        f"cannot read image file '{path}' ({reason}); delete or replace the file, "
        f"or pass --on-bad-image skip to leave unreadable files out"
    )


def square(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``image_size`` as (H, W): a side length gives a square."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])


def decode_files(
    paths: list[str], size: tuple[int, int] | None, on_bad_image: str, num_workers: int | None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, chunk: int = POOL_CHUNK,
) -> tuple[Groups, list[tuple[int, str]]]:
    """Decode ``paths`` (in a process pool when there are many), each resized to ``size`` (H, W)
    when given; raise on a bad file in error mode. Returns the decoded groups (per task of
    ``chunk`` files and per image size) and the (position, reason) of every bad file."""
    n = len(paths)
    tasks = [
        (list(range(s, min(s + chunk, n))), paths[s : s + chunk], size, max_pixels)
        for s in range(0, n, chunk)
    ]
    workers = min(_worker_count(n, num_workers), len(tasks))
    if workers >= 2 and multiprocessing.current_process().daemon:
        workers = 0  # a daemonic process may not start children
    groups: Groups = []
    bad: list[tuple[int, str]] = []

    def take(result: tuple[Groups, list[tuple[int, str]]]) -> None:
        g, b = result
        if b and on_bad_image == "error":
            pos, reason = b[0]
            raise bad_image_error(paths[pos], reason)
        groups.extend(g)
        bad.extend(b)

    if workers >= 2:
        with _pool_context().Pool(processes=workers) as pool:
            for result in pool.imap(_decode_chunk, tasks):
                take(result)  # raising here leaves the with-block, which terminates the pool
    else:
        for task in tasks:
            take(_decode_chunk(task))
    return groups, bad


def assemble(n: int, groups: Groups, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Put decoded groups into one (N, 3, H, W) tensor; returns it and a 'decoded' mask.

    Images of other sizes than the most common one are resized to it (logged).
    """
    from PIL import Image

    counts: Counter[tuple[int, int]] = Counter()
    for key, pos, _ in groups:
        counts[key] += len(pos)
    # most common size; ties go to the larger image so that the choice is deterministic
    target = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    h, w = target
    out = torch.empty((n, 3, h, w), dtype=torch.uint8)
    ok = torch.zeros(n, dtype=torch.bool)
    n_resized = 0
    for key, pos, arr in groups:
        if key != target:
            arr = np.stack(
                [np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR), dtype=np.uint8) for a in arr]
            )
            n_resized += len(pos)
        p = torch.from_numpy(pos)
        out[p] = torch.from_numpy(arr).permute(0, 3, 1, 2)
        ok[p] = True
    if n_resized:
        logger.info(
            "images under '%s' come in %d sizes; resized %d of them to %dx%d (the most common size). "
            "Pass --input_size to choose the size instead.",
            root,
            len(counts),
            n_resized,
            h,
            w,
        )
    return out, ok
