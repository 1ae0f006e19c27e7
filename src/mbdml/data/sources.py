"""Load real image data into memory once, as uint8 tensors.

Every source (a folder of class folders, CIFAR python pickles, IDX files, the
scikit-learn digits) ends up as an :class:`ImageSet`: one contiguous uint8 tensor
``(N, C, H, W)``, int64 labels and the class names. Decoding happens once per
process (or once per machine with ``cache_dir``); batches are then cut from the
tensors without per-image Python work (see :mod:`mbdml.data.batches`).

Bad input never ends in a raw PIL/numpy traceback: it raises
:class:`~mbdml.errors.DataError` with the file concerned and the fix.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mbdml.data.cifar_pickle import read_cifar_pickle
from mbdml.errors import ConfigError, DataError

logger = logging.getLogger("mbdml")

__all__ = [
    "ImageSet",
    "load_image_folder",
    "load_cifar_pickle",
    "load_idx",
    "load_digits_builtin",
    "load_fashion_mnist",
    "load_dataset",
    "is_dataset_name",
    "check_max_image_pixels",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "find_cifar10_archive",
    "unpack_cifar10_archive",
    "resize_images",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_ARCHIVE_NAME",
    "CIFAR10_SPLITS",
    "DATASET_NAMES",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
DATASET_NAMES = ("digits", "fashion-mnist", "cifar10")
ON_BAD_IMAGE_CHOICES = ("error", "skip")

_CACHE_FORMAT = "mbdml-imageset-v1"
_UNPACK_DIRNAME = "cifar10-jpeg"
_UNPACK_MARKER = ".mbdml-unpacked"
# Below this many files decoding runs in this process: starting workers costs more.
_POOL_MIN_FILES = 2048
_POOL_CHUNK = 1024
_RESIZE_CHUNK = 1024


# --------------------------------------------------------------------------- ImageSet


@dataclass
class ImageSet:
    """Images held in memory: what every loader returns.

    ``images`` is uint8 ``(N, C, H, W)`` and contiguous, ``labels`` int64 ``(N,)``
    with values indexing ``classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"ImageSet images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}; convert the images to uint8 0..255 first"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"ImageSet has {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}; give exactly one label per image"
            )
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of class names (a class may have no image in this set)."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Number of colour channels C."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The images at ``indices`` (in that order), with the same class list."""
        idx = torch.as_tensor(indices).reshape(-1)
        idx = idx.nonzero().reshape(-1) if idx.dtype == torch.bool else idx.to(torch.int64)
        return ImageSet(self.images[idx].contiguous(), self.labels[idx], list(self.classes))


# --------------------------------------------------------------------------- helpers


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a uint8 ``(N, C, H, W)`` tensor with antialiased bilinear interpolation.

    Done once at load time for the tensor sources (pickle, IDX, digits), in chunks
    so that the float copy stays small; the result is rounded back to uint8.
    """
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if hw[0] < 1 or hw[1] < 1:
        raise ConfigError(f"image size {size} is not positive; pass --input_size 1 or more")
    if tuple(images.shape[2:]) == hw:
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], hw[0], hw[1]), dtype=torch.uint8)
    for s in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[s : s + _RESIZE_CHUNK].to(torch.float32)
        res = F.interpolate(chunk, size=hw, mode="bilinear", align_corners=False, antialias=True)
        out[s : s + _RESIZE_CHUNK] = res.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _normalise_ext(im_ext: str) -> str:
    """``im_ext`` lower-cased without dots: one extension, or several joined by commas ('jpg,png')."""
    exts = [e.strip().lower().lstrip(".") for e in str(im_ext).split(",")]
    if not all(exts) or any("/" in e or os.sep in e for e in exts):
        raise ConfigError(f"image extension {im_ext!r} is not valid; pass --im_ext like 'jpg', 'png' or 'jpg,jpeg,png'")
    return ",".join(dict.fromkeys(exts))


def _ext_names(ext: str) -> str:
    """'.jpg', or '.jpg' or '.png', for messages."""
    return " or ".join(f"'.{e}'" for e in ext.split(","))


def _check_on_bad_image(on_bad_image: str) -> None:
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


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image size {image_size!r} is not a positive integer; pass --input_size 32, say")


# What counts as an image file of another extension when files are left out (reported, with how to include them).
_IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .jpe .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm".split())
# Images larger than this (in pixels) are refused unless --max_image_pixels raises it: 100 megapixels
# (300 MB decoded), above any camera's picture, and well below what a decompression bomb asks for.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


class ImageTooLarge(ValueError):
    """An image has more pixels than the cap (a decompression bomb, or a huge picture)."""


def _describe_extensions(counts: Counter[str]) -> str:
    parts = [f"{n} '{ext or '(no extension)'}'" for ext, n in counts.most_common(5)]
    return ", ".join(parts)


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


def _decode_one(path: str, image_size: int | None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one file to an RGB uint8 (H, W, 3) array; raises on any problem."""
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
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoded to an array of shape {arr.shape}, not (H, W, 3)")
    return arr


def _decode_chunk(
    task: tuple[list[int], list[str], int | None, int | None],
) -> tuple[list[tuple[tuple[int, int], np.ndarray, np.ndarray]], list[tuple[int, str]]]:
    """Worker: decode files, group the results by size (one stacked array per size)."""
    positions, paths, image_size, max_pixels = task
    groups: dict[tuple[int, int], tuple[list[int], list[np.ndarray]]] = {}
    bad: list[tuple[int, str]] = []
    for pos, path in zip(positions, paths):
        try:
            arr = _decode_one(path, image_size, max_pixels)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            bad.append((pos, f"{type(exc).__name__}: {exc}"))
            continue
        key = (int(arr.shape[0]), int(arr.shape[1]))
        g = groups.setdefault(key, ([], []))
        g[0].append(pos)
        g[1].append(arr)
    out = [(k, np.asarray(p, dtype=np.int64), np.stack(a)) for k, (p, a) in groups.items()]
    return out, bad


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


def _bad_image_error(path: str, reason: str) -> DataError:
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


def _decode_files(
    paths: list[str], image_size: int | None, on_bad_image: str, num_workers: int | None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[list[tuple[tuple[int, int], np.ndarray, np.ndarray]], list[tuple[int, str]]]:
    """Decode ``paths`` (in a process pool when there are many); raise on a bad file in error mode."""
    n = len(paths)
    tasks = [
        (list(range(s, min(s + _POOL_CHUNK, n))), paths[s : s + _POOL_CHUNK], image_size, max_pixels)
        for s in range(0, n, _POOL_CHUNK)
    ]
    workers = min(_worker_count(n, num_workers), len(tasks))
    if workers >= 2 and multiprocessing.current_process().daemon:
        workers = 0  # a daemonic process may not start children
    groups: list[tuple[tuple[int, int], np.ndarray, np.ndarray]] = []
    bad: list[tuple[int, str]] = []

    def take(result: tuple[list[Any], list[tuple[int, str]]]) -> None:
        g, b = result
        if b and on_bad_image == "error":
            pos, reason = b[0]
            raise _bad_image_error(paths[pos], reason)
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


def _assemble(
    n: int, groups: list[tuple[tuple[int, int], np.ndarray, np.ndarray]], root: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put decoded groups into one (N, 3, H, W) tensor; returns it and a 'decoded' mask."""
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


# --------------------------------------------------------------------------- image folders


def _missing_path_error(path: Path, what: str, fix: str) -> DataError:
    """'does not exist', or the real reason when ``path`` is a link that leads nowhere."""
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        why = "loops back on itself" if _is_link_loop(path) else f"points to '{target}', which does not exist"
        return DataError(f"{what} '{path}' is a symbolic link that {why}; fix or remove the link, or {fix}")
    return DataError(f"{what} '{path}' does not exist; {fix}")


def _is_link_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """'dir', 'file', 'loop' (a link that loops), 'broken' (a link to nothing) or 'other'."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
    except OSError as exc:
        return "loop" if exc.errno == errno.ELOOP else "broken"
    if entry.is_symlink():
        return "loop" if _is_link_loop(Path(entry.path)) else "broken"
    return "other"


def _check_class_link(root: Path, entry: os.DirEntry[str]) -> None:
    """Refuse a class folder that is a link to the data folder itself or a folder above it
    (``self -> .``): it would read as a class holding the other class folders."""
    if not entry.is_symlink():
        return
    target = Path(entry.path).resolve()
    if target == root or target in root.parents:
        raise DataError(
            f"class folder '{root / entry.name}' is a symbolic link to '{target}', which is the data folder "
            f"'{root}' or a folder above it (a link loop, not a class); remove the link"
        )


def _list_class_folders(root: Path, im_ext: str, classes: list[str] | None) -> tuple[list[str], list[tuple[str, int, str, int, int]]]:
    """Returns the class list and (relative path, label, absolute path, size, mtime_ns) per image.

    ``im_ext`` is one extension or several joined by commas. Files of other image
    extensions are left out and counted in a warning that says how to include them;
    links that loop or lead nowhere are named in an error (class folders) or counted
    (files).
    """
    if not root.exists():
        raise _missing_path_error(root, "image folder", "check the path (--data_dir / --test)")
    if not root.is_dir():
        raise DataError(
            f"'{root}' is a file, not a folder; pass a folder laid out as <folder>/<class name>/<image>.{im_ext}"
        )
    try:
        entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list image folder '{root}' ({exc}); check that it is readable") from exc
    kinds = {e.name: _entry_kind(e) for e in entries}
    for e in entries:
        if kinds[e.name] in ("loop", "broken"):
            raise _missing_path_error(root / e.name, "class folder", "move it out of the data folder")
        if kinds[e.name] == "dir":
            _check_class_link(root, e)
    sub = [e.name for e in entries if kinds[e.name] == "dir"]
    if not sub:
        loose = sum(1 for e in entries if kinds[e.name] == "file")
        hint = f" (it holds {loose} loose files)" if loose else ""
        raise DataError(
            f"image folder '{root}' has no class sub-folders{hint}; put the images in one sub-folder per "
            f"class: '{root}/<class name>/<image>.{im_ext}'"
        )
    if classes is None:
        class_list = sub
    else:
        class_list = [str(c) for c in classes]
        unknown = [s for s in sub if s not in class_list]
        if unknown:
            raise DataError(
                f"class folder(s) {', '.join(repr(u) for u in unknown)} under '{root}' are not among the "
                f"{len(class_list)} training classes ({', '.join(class_list[:10])}"
                f"{', ...' if len(class_list) > 10 else ''}); rename or remove those folders, or add the "
                f"classes to the training set"
            )
    index = {c: i for i, c in enumerate(class_list)}
    suffixes = {"." + e for e in im_ext.split(",")}
    files: list[tuple[str, int, str, int, int]] = []
    left_out: Counter[str] = Counter()  # image files of other extensions, in folders that have images
    bad_links = 0
    for name in sub:
        folder = root / name
        found: list[tuple[str, int, int]] = []
        others: Counter[str] = Counter()
        links = 0
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    kind = _entry_kind(e)
                    if kind in ("loop", "broken"):
                        links += 1
                        continue
                    if kind != "file":
                        continue
                    ext = os.path.splitext(e.name)[1].lower()
                    if ext in suffixes:
                        st = e.stat()
                        found.append((e.name, st.st_size, st.st_mtime_ns))
                    else:
                        others[ext] += 1
        except OSError as exc:
            raise DataError(f"cannot list class folder '{folder}' ({exc}); check that it is readable") from exc
        if not found:
            what = f"it holds {_describe_extensions(others)} files instead" if others else (
                f"it holds only {links} link(s) that loop or lead nowhere" if links else "it is empty")
            fix = "pass --im_ext to match them, add images, or remove the folder" if others else "add images or remove the folder"
            raise DataError(f"class folder '{folder}' holds no {_ext_names(im_ext)} images ({what}); {fix}")
        left_out.update({k: v for k, v in others.items() if k in _IMAGE_EXTENSIONS})
        bad_links += links
        found.sort()
        for fname, size, mtime in found:
            files.append((f"{name}/{fname}", index[name], str(folder / fname), size, mtime))
    if left_out:
        wider = ",".join(dict.fromkeys(im_ext.split(",") + [k.lstrip(".") for k, _ in left_out.most_common()]))
        logger.warning(
            "left out %d image file(s) under '%s' whose extension is not %s (%s); to use them too, pass --im_ext %s",
            sum(left_out.values()), root, _ext_names(im_ext), _describe_extensions(left_out), wider,
        )
    if bad_links:
        logger.warning("left out %d link(s) under '%s' that loop or lead nowhere; fix or remove them", bad_links, root)
    return class_list, files


def _cache_key(
    root: Path, im_ext: str, image_size: int | None, classes: list[str] | None, on_bad_image: str,
    files: list[tuple[str, int, str, int, int]], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> str:
    h = hashlib.sha1()
    head: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "root": str(root),
        "im_ext": im_ext,
        "image_size": image_size,
        "classes": classes,
        "on_bad_image": on_bad_image,
    }
    if on_bad_image == "skip":  # the cap decides which files are left out; in error mode it only refuses
        head["max_image_pixels"] = max_pixels
    h.update(json.dumps(head, sort_keys=True).encode())
    for rel, _, _, size, mtime in sorted(files):
        h.update(f"\n{rel}\t{size}\t{mtime}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _read_cache(path: Path) -> tuple[ImageSet, list[str]] | None:
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT:
            raise ValueError("not an mbdml image cache")
        images, labels, classes = obj["images"], obj["labels"], obj["classes"]
        skipped = list(obj.get("skipped", []))
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError("cache entries are not tensors")
        return ImageSet(images, labels, list(classes)), skipped
    except Exception as exc:  # noqa: BLE001 - a broken cache only costs a re-decode
        logger.warning("image cache '%s' is unreadable (%s); decoding the images again", path, exc)
        return None


def _write_cache(path: Path, data: ImageSet, skipped: list[str]) -> None:
    """Store the decoded set atomically; a full disk or an unwritable folder only costs the cache
    (a warning, and no partial file is left)."""
    from mbdml.checkpoint import is_write_failure, write_failure_reason

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _CACHE_FORMAT,
            "images": data.images,
            "labels": data.labels,
            "classes": list(data.classes),
            "skipped": list(skipped),
        }
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if not is_write_failure(exc):
            raise
        reason = write_failure_reason(exc, path.parent)
        logger.warning(
            "cannot write image cache '%s' (%s); continuing without it: free disk space in '%s' or pass another "
            "--cache_dir to keep the decoded images for the next run",
            path, reason, path.parent,
        )


def _warn_skipped(root: Path, skipped: list[str]) -> None:
    if skipped:
        logger.warning(
            "skipped %d unreadable image file(s) under '%s' (for example '%s')",
            len(skipped),
            root,
            skipped[0],
        )


def load_image_folder(
    root: str | Path,
    im_ext: str = "jpg",
    image_size: int | None = None,
    classes: list[str] | None = None,
    on_bad_image: str = "error",
    cache_dir: str | Path | None = None,
    *,
    num_workers: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageSet:
    """Decode ``root/<class name>/*.<im_ext>`` into an :class:`ImageSet` (the authors' layout).

    Classes are the sorted sub-folder names, or ``classes`` (to map a test folder
    onto the training classes by name). Every image becomes RGB; with
    ``image_size`` it is resized to a square with PIL bilinear, otherwise images of
    other sizes are resized to the most common size. ``on_bad_image`` is "error"
    (a :class:`DataError` naming the file) or "skip" (leave it out, log a warning).
    With ``cache_dir`` the decoded set is stored as ``<sha1>.pt`` keyed by the
    folder, the options and every file's path, size and mtime, so a second load
    only reads one file. ``num_workers`` forces the number of decoding processes
    (0 = decode here); by default a pool is used for 2048 files or more.
    ``im_ext`` may name several extensions ('jpg,jpeg,png'). An image of more than
    ``max_image_pixels`` pixels (None: no cap) is refused before it is decoded, like
    an unreadable one (``on_bad_image``).
    """
    _check_on_bad_image(on_bad_image)
    _check_image_size(image_size)
    check_max_image_pixels(max_image_pixels)
    ext = _normalise_ext(im_ext)
    root = Path(root).expanduser()
    try:
        root = root.resolve()
    except (OSError, RuntimeError):  # a link loop: reported below with what is wrong
        pass
    class_list, files = _list_class_folders(root, ext, classes)

    cache_path: Path | None = None
    if cache_dir is not None:
        key = _cache_key(root, ext, image_size, None if classes is None else class_list, on_bad_image, files, max_image_pixels)
        cache_path = Path(cache_dir).expanduser() / f"{key}.pt"
        cached = _read_cache(cache_path)
        if cached is not None:
            data, skipped = cached
            logger.debug("loaded %d images of '%s' from cache '%s'", len(data), root, cache_path)
            _warn_skipped(root, skipped)
            return data

    paths = [f[2] for f in files]
    labels_all = torch.tensor([f[1] for f in files], dtype=torch.int64)
    groups, bad = _decode_files(paths, image_size, on_bad_image, num_workers, max_image_pixels)
    skipped = [files[pos][0] for pos, _ in sorted(bad)]
    if not groups:
        raise DataError(
            f"none of the {len(files)} {_ext_names(ext)} files under '{root}' could be read (first: '{paths[bad[0][0]]}': "
            f"{bad[0][1]}); check that they are images, or pass --im_ext to match your files"
        )
    images, ok = _assemble(len(files), groups, root)
    if bad:
        images = images[ok].contiguous()
        labels_all = labels_all[ok]
        present = set(labels_all.unique().tolist())
        gone = sorted({files[pos][1] for pos, _ in bad} - present)
        if gone:
            names = ", ".join(f"'{root / class_list[c]}'" for c in gone)
            raise DataError(
                f"class folder(s) {names} hold no readable image once the unreadable files are skipped; "
                f"replace the broken files or remove the folder(s)"
            )
        _warn_skipped(root, skipped)
    data = ImageSet(images, labels_all, class_list)
    logger.info(
        "decoded %d images (%d classes, %dx%d, %.1f MB) from '%s'",
        len(data), data.num_classes, data.image_size[0], data.image_size[1], images.numel() / 1e6, root,
    )
    if cache_path is not None:
        _write_cache(cache_path, data, skipped)
    return data


# --------------------------------------------------------------------------- CIFAR pickles


def _resolve_cifar_root(root: Path) -> Path:
    for cand in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (cand / "data_batch_1").is_file() or (cand / "batches.meta").is_file():
            return cand
        if (cand / "meta").is_file() and ((cand / "train").is_file() or (cand / "test").is_file()):
            return cand
    return root


def _dict_get(d: dict[Any, Any], key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(
        f"CIFAR file '{path}' has no '{key}' entry; it is not a CIFAR python pickle: replace it with the "
        f"file from the 'python version' archive"
    )


def _unpickle(path: Path) -> dict[Any, Any]:
    """A CIFAR pickle's dict, read without running code (:mod:`mbdml.data.cifar_pickle`)."""
    if not path.is_file():
        raise DataError(
            f"CIFAR file '{path}' is missing; unpack the CIFAR 'python version' archive there "
            f"(CIFAR-10: data_batch_1..5, test_batch, batches.meta; CIFAR-100: train, test, meta)"
        )
    obj = read_cifar_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(
            f"CIFAR file '{path}' holds a {type(obj).__name__}, not a dict; replace it with the file from the "
            f"CIFAR 'python version' archive"
        )
    return obj


def _class_names(raw: Any, path: Path, key: str) -> list[str]:
    """The meta file's class names: a non-empty list of text or byte strings."""
    what = None
    if not isinstance(raw, list):
        what = f"a {type(raw).__name__}"
    elif not raw:
        what = "an empty list"
    else:
        bad = [n for n in raw if not isinstance(n, (str, bytes))]
        if bad:
            what = f"a list holding {type(bad[0]).__name__} values such as {str(bad[0])[:40]!r}"
    if what is not None:
        raise DataError(
            f"CIFAR file '{path}' has '{key}' as {what}, not a list of class names (strings); replace it with the "
            f"file from the CIFAR 'python version' archive"
        )
    try:
        return [n.decode("utf-8") if isinstance(n, bytes) else n for n in raw]
    except UnicodeDecodeError as exc:
        raise DataError(
            f"CIFAR file '{path}' has a class name in '{key}' that is not UTF-8 text ({exc}); replace it with the "
            f"file from the CIFAR 'python version' archive"
        ) from None


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = np.asarray(_dict_get(d, "data", path))
    raw_labels = _dict_get(d, label_key, path)
    if isinstance(raw_labels, np.ndarray) and raw_labels.dtype.kind in "iu":
        labels = raw_labels
    elif isinstance(raw_labels, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels):
        labels = np.asarray(raw_labels, dtype=np.int64)
    else:
        raise DataError(
            f"CIFAR file '{path}' has '{label_key}' that is not a list of whole numbers; replace it with the "
            f"file from the CIFAR 'python version' archive"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"CIFAR file '{path}' has 'data' of dtype {data.dtype} and shape {data.shape}, not uint8 (N, 3072); "
            f"replace it with the file from the CIFAR 'python version' archive"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR file '{path}' has {data.shape[0]} images but {labels.size} labels; replace it with the "
            f"file from the CIFAR 'python version' archive"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"CIFAR file '{path}' has labels outside 0..{num_classes - 1}; replace it with the file from the "
            f"CIFAR 'python version' archive"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_pickle(root: str | Path, train: bool) -> ImageSet:
    """Load the CIFAR-10 or CIFAR-100 "python version" (pickled batches) from ``root``.

    CIFAR-10: ``data_batch_1..5``/``test_batch`` with ``batches.meta``; CIFAR-100:
    ``train``/``test`` with ``meta`` (fine labels). ``root`` may also be the folder
    holding ``cifar-10-batches-py`` or ``cifar-100-python``. The files are Python
    pickles, read by a restricted unpickler (:mod:`mbdml.data.cifar_pickle`): a file
    that asks for anything but dicts, lists, strings, numbers and numeric arrays is
    refused, and nothing in it runs.
    """
    root = _resolve_cifar_root(Path(root).expanduser())
    if not root.is_dir():
        raise DataError(f"CIFAR folder '{root}' does not exist; pass the folder of the unpacked 'python version'")
    if (root / "data_batch_1").is_file() or (root / "batches.meta").is_file():
        meta = _unpickle(root / "batches.meta")
        names_key, label_key = "label_names", "labels"
        files = [root / f"data_batch_{i}" for i in range(1, 6)] if train else [root / "test_batch"]
    elif (root / "meta").is_file():
        meta = _unpickle(root / "meta")
        names_key, label_key = "fine_label_names", "fine_labels"
        files = [root / ("train" if train else "test")]
    else:
        raise DataError(
            f"'{root}' holds no CIFAR python files (neither 'batches.meta' nor 'meta'); pass the folder of the "
            f"unpacked 'python version' archive (cifar-10-batches-py or cifar-100-python)"
        )
    meta_path = root / ("batches.meta" if label_key == "labels" else "meta")
    classes = _class_names(_dict_get(meta, names_key, meta_path), meta_path, names_key)
    parts = [_cifar_batch(f, label_key, len(classes)) for f in files]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet(images, labels, classes)


# --------------------------------------------------------------------------- IDX (MNIST)


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"IDX file '{path}' is missing; check the path, or unpack the MNIST-format files there")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:  # type: ignore[operator]
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"cannot read IDX file '{path}' ({type(exc).__name__}: {exc}); the file is damaged: get a fresh copy"
        ) from exc


def load_idx(
    images_file: str | Path, labels_file: str | Path, classes: list[str] | None = None
) -> ImageSet:
    """Load an MNIST-style IDX pair (gzipped or not) as ``(N, 1, rows, cols)`` uint8 images.

    The magic numbers (0x803 images, 0x801 labels) and the counts are checked;
    classes default to "0".."9".
    """
    images_file, labels_file = Path(images_file).expanduser(), Path(labels_file).expanduser()
    raw = _read_maybe_gzip(images_file)
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic != 0x00000803:
        got = "no magic number" if magic is None else f"magic number 0x{magic:08x}"
        raise DataError(
            f"IDX image file '{images_file}' has {got}, not 0x00000803; it is not an IDX "
            f"image file (did you swap the images and labels files?) or it is damaged: get a fresh copy"
        )
    if len(raw) < 16:
        raise DataError(f"IDX image file '{images_file}' is too short ({len(raw)} bytes); get a fresh copy")
    _, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if len(raw) != 16 + n * rows * cols:
        raise DataError(
            f"IDX image file '{images_file}' should hold {n} images of {rows}x{cols} ({16 + n * rows * cols} "
            f"bytes) but has {len(raw)} bytes; the file is truncated or damaged: get a fresh copy"
        )
    lraw = _read_maybe_gzip(labels_file)
    lmagic = struct.unpack(">I", lraw[:4])[0] if len(lraw) >= 4 else None
    if lmagic != 0x00000801:
        got = "no magic number" if lmagic is None else f"magic number 0x{lmagic:08x}"
        raise DataError(
            f"IDX label file '{labels_file}' has {got}, not 0x00000801; it is not an IDX "
            f"label file (did you swap the images and labels files?) or it is damaged: get a fresh copy"
        )
    if len(lraw) < 8:
        raise DataError(f"IDX label file '{labels_file}' is too short ({len(lraw)} bytes); get a fresh copy")
    _, ln = struct.unpack(">II", lraw[:8])
    if len(lraw) != 8 + ln:
        raise DataError(
            f"IDX label file '{labels_file}' should hold {ln} labels but has {len(lraw) - 8} bytes of labels; "
            f"the file is truncated or damaged: get a fresh copy"
        )
    if ln != n:
        raise DataError(
            f"IDX files disagree: '{images_file}' holds {n} images but '{labels_file}' holds {ln} labels; "
            f"pass the label file that belongs to these images"
        )
    class_list = [str(i) for i in range(10)] if classes is None else [str(c) for c in classes]
    labels = torch.from_numpy(np.frombuffer(lraw, dtype=np.uint8, offset=8).astype(np.int64))
    if n and int(labels.max()) >= len(class_list):
        raise DataError(
            f"IDX label file '{labels_file}' has label {int(labels.max())} but only {len(class_list)} classes "
            f"are named; pass the full list of class names"
        )
    images = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, rows, cols).copy())
    return ImageSet(images, labels, class_list)


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # e.g. stem "train-images-idx3-ubyte"; some copies use "train-images.idx3-ubyte"
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_folder(folder: Path, classes: list[str] | None = None) -> tuple[ImageSet, ImageSet]:
    found = {}
    for part in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        p = _find_idx_file(folder, part)
        if p is None:
            raise DataError(
                f"IDX folder '{folder}' lacks '{part}' (or '{part}.gz'); the folder needs all four files "
                f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
            )
        found[part] = p
    train = load_idx(found["train-images-idx3-ubyte"], found["train-labels-idx1-ubyte"], classes)
    test = load_idx(found["t10k-images-idx3-ubyte"], found["t10k-labels-idx1-ubyte"], classes)
    return train, test


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST (train 60,000, test 10,000, 1x28x28) from the IDX files in ``root``.

    The default folder is where the Debian package ``dataset-fashion-mnist`` puts them.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir() or _find_idx_file(folder, "train-images-idx3-ubyte") is None:
        raise DataError(
            f"Fashion-MNIST is not in '{folder}'; run 'apt-get install dataset-fashion-mnist' "
            f"(files go to {FASHION_MNIST_DIR}), or pass the path of a folder holding the four IDX files"
        )
    return _load_idx_folder(folder, list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------- digits


def load_digits_builtin(test_fraction: float = 0.25, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 8x8 digits as uint8 (N, 1, 8, 8), split into (train, test).

    Values 0..16 are scaled to 0..255. The split is stratified and decided by
    ``seed`` alone, so the test set is the same on every call.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction={test_fraction} must lie strictly between 0 and 1; pass 0.25, say")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(np.asarray(bunch.data, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(x.reshape(-1, 1, 8, 8).copy())
    labels_np = np.asarray(bunch.target, dtype=np.int64)
    test_idx: list[np.ndarray] = []
    for c in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == c)
        rng = np.random.default_rng([int(seed) % (2**63), int(c)])
        k = min(len(idx) - 1, max(1, int(round(test_fraction * len(idx)))))
        test_idx.append(np.sort(rng.permutation(idx)[:k]))
    test_sel = np.sort(np.concatenate(test_idx))
    mask = np.ones(len(labels_np), dtype=bool)
    mask[test_sel] = False
    classes = [str(i) for i in range(10)]
    labels = torch.from_numpy(labels_np)
    full = ImageSet(images, labels, classes)
    return full.subset(torch.from_numpy(np.flatnonzero(mask))), full.subset(torch.from_numpy(test_sel))


# --------------------------------------------------------------------------- the CIFAR-10 JPEG archive


def _package_repo_root() -> Path:
    # .../<repo>/src/mbdml/data/sources.py -> <repo>
    return Path(__file__).resolve().parents[3]


def find_cifar10_archive() -> Path | None:
    """Find ``cifar10-jpeg.tar.gz``: in ``$MBDML_DATA``, ``./shared/data``, ``../shared/data``
    (from the working folder), then ``shared/data`` and ``../shared/data`` beside the repository.
    """
    candidates: list[Path] = []
    env = os.environ.get("MBDML_DATA")
    if env:
        p = Path(env).expanduser()
        candidates.append(p if p.name == CIFAR10_ARCHIVE_NAME else p / CIFAR10_ARCHIVE_NAME)
    cwd = Path.cwd()
    repo = _package_repo_root()
    for base in (cwd / "shared" / "data", cwd.parent / "shared" / "data", repo / "shared" / "data", repo.parent / "shared" / "data"):
        candidates.append(base / CIFAR10_ARCHIVE_NAME)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def _cifar10_search_places() -> str:
    return "$MBDML_DATA, ./shared/data, ../shared/data and the repository's shared/data"


CIFAR10_SPLITS = ("train", "test")


def _find_base(folder: Path, splits: Sequence[str]) -> Path | None:
    """The folder (``folder`` or one of its sub-folders) that holds every split folder."""
    if not folder.is_dir():
        return None
    for cand in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if all((cand / s).is_dir() for s in splits):
            return cand
    return None


def _check_member(archive: Path, m: tarfile.TarInfo) -> tuple[str, ...]:
    name = m.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(
            f"archive '{archive}' holds an unsafe member '{name}' (absolute path or '..'); refusing to unpack it: "
            f"get a fresh copy of {CIFAR10_ARCHIVE_NAME}"
        )
    if not (m.isfile() or m.isdir()):
        raise DataError(
            f"archive '{archive}' holds '{name}', which is a link or a special file; refusing to unpack it: "
            f"get a fresh copy of {CIFAR10_ARCHIVE_NAME}"
        )
    return parts


def _member_wanted(parts: tuple[str, ...], is_dir: bool, splits: set[str]) -> bool:
    # the split folder is the first or second path component (cifar10/test/cat/0000.jpg or test/cat/...)
    head = [p for p in parts[:2] if p in CIFAR10_SPLITS]
    if head:
        return head[0] in splits
    return is_dir  # the top folder itself


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(marker.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def unpack_cifar10_archive(
    archive: str | Path, cache_dir: str | Path, splits: Sequence[str] = CIFAR10_SPLITS
) -> Path:
    """Unpack the CIFAR-10 JPEG archive into ``cache_dir/cifar10-jpeg`` once; return the
    folder that holds the ``splits`` folders (by default ``train/`` and ``test/``).

    Members with absolute paths, '..', links or special files are refused. The
    archive is unpacked by a plain loop that writes only regular files and folders
    (no owners, modes or times: fewer system calls than ``extractall``) into a
    temporary folder, which is renamed when complete; a marker file records the
    archive and the splits, so later calls return at once. ``splits=("test",)``
    writes only the 10,000 test images (a sixth of the files).
    """
    wanted = set(splits)
    if not wanted or not wanted <= set(CIFAR10_SPLITS):
        raise ConfigError(f"splits {tuple(splits)!r} must be a non-empty choice of 'train' and 'test'")
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise DataError(
            f"CIFAR-10 archive '{archive}' does not exist; put {CIFAR10_ARCHIVE_NAME} in shared/data or set "
            f"MBDML_DATA to its folder"
        )
    cache = Path(cache_dir).expanduser()
    dest = cache / _UNPACK_DIRNAME
    marker = dest / _UNPACK_MARKER
    stamp: dict[str, Any] = {"archive": archive.name, "size": archive.stat().st_size}
    prev = _read_marker(marker) if marker.is_file() else None
    if prev is not None and all(prev.get(k) == v for k, v in stamp.items()):
        if wanted <= set(prev.get("splits", ())):
            found = _find_base(dest, sorted(wanted))
            if found is not None:
                return found
        wanted |= set(prev.get("splits", ())) & set(CIFAR10_SPLITS)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache folder '{cache}' ({exc}); pass a writable --cache-dir") from exc
    tmp = cache / f".{_UNPACK_DIRNAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        made: set[Path] = set()
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:  # streaming: one pass over the compressed file
                parts = _check_member(archive, m)  # checked before anything is written for it
                if not parts or not _member_wanted(parts, m.isdir(), wanted):
                    continue
                target = tmp.joinpath(*parts)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                src = tf.extractfile(m)
                assert src is not None
                with open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot unpack '{archive}' ({type(exc).__name__}: {exc}); the archive is damaged or the disk is "
            f"full: get a fresh copy of {CIFAR10_ARCHIVE_NAME} or free space in '{cache}'"
        ) from exc
    if _find_base(tmp, sorted(wanted)) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"archive '{archive}' holds no folder with {' and '.join(s + '/' for s in sorted(wanted))} inside; "
            f"it is not {CIFAR10_ARCHIVE_NAME}: get a fresh copy"
        )
    shutil.rmtree(dest, ignore_errors=True)  # an earlier, smaller or stale unpacking of ours
    os.replace(tmp, dest)
    marker.write_text(json.dumps({**stamp, "splits": sorted(wanted)}))
    found = _find_base(dest, sorted(wanted))
    assert found is not None
    logger.info("unpacked %s of '%s' into '%s'", "/".join(sorted(wanted)), archive, dest)
    return found


# --------------------------------------------------------------------------- load_dataset


def _is_class_folder_root(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return any(not e.name.startswith(".") and _entry_kind(e) == "dir" for e in it)
    except OSError:
        return False


def _is_cifar_pickle_folder(p: Path) -> bool:
    for cand in (p, p / "cifar-10-batches-py", p / "cifar-100-python"):
        if (cand / "data_batch_1").is_file():
            return True
        if (cand / "train").is_file() and (cand / "meta").is_file():
            return True
    return False


def _match_size(test: ImageSet, train: ImageSet) -> ImageSet:
    if test.image_size == train.image_size:
        return test
    logger.info(
        "test images are %dx%d, training images %dx%d; resizing the test images to match",
        *test.image_size, *train.image_size,
    )
    return ImageSet(resize_images(test.images, train.image_size), test.labels, test.classes)


def _resize_pair(train: ImageSet, test: ImageSet, image_size: int | None) -> tuple[ImageSet, ImageSet]:
    if image_size is None:
        return train, test
    return (
        ImageSet(resize_images(train.images, image_size), train.labels, train.classes),
        ImageSet(resize_images(test.images, image_size), test.labels, test.classes),
    )


def _no_test_dir(spec: str, test_dir: str | Path | None) -> None:
    if test_dir is not None:
        raise ConfigError(
            f"a test folder ('{test_dir}') was given, but data '{spec}' brings its own test set; drop --test, "
            f"or pass a folder of class folders as --data_dir"
        )


_NAME_ALIASES = {"digits": "digits", "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
                 "fashionmnist": "fashion-mnist", "cifar10": "cifar10", "cifar-10": "cifar10"}


def is_dataset_name(spec: str) -> bool:
    """Whether ``spec`` names a built-in data set (digits, fashion-mnist, cifar10) rather than a path."""
    return str(spec).strip().lower() in _NAME_ALIASES


def _check_two_classes(spec: str, train: ImageSet) -> None:
    """A classifier needs two classes: refuse a data set with one (every metric would read 100%)."""
    present = sorted(set(train.labels.tolist()))
    if train.num_classes < 2 or len(present) < 2:
        only = train.classes[present[0]] if present else (train.classes[0] if train.classes else "?")
        raise DataError(
            f"data set '{spec}' has a single class ('{only}'): every image would be classified right and every "
            f"metric would read 100%; a classifier needs at least two classes: add a folder (or labels) per class"
        )


def load_dataset(
    spec: str,
    test_dir: str | Path | None = None,
    im_ext: str = "jpg",
    image_size: int | None = None,
    on_bad_image: str = "error",
    cache_dir: str | Path | None = ".cache/mbdml",
    *,
    num_workers: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[ImageSet, ImageSet]:
    """Return (train, test) for a named data set or a path.

    Names: "digits" (scikit-learn), "fashion-mnist" (Debian package), "cifar10"
    (the JPEG archive, unpacked into ``cache_dir``). A path may be a folder with
    ``train/`` and ``test/`` class folders (``test_dir``, when given, replaces
    ``test/``), a CIFAR pickle folder, an IDX folder,
    or a folder of class folders used as the training set with ``test_dir`` as the
    test set (the authors' ``--data_dir`` / ``--test``). Test classes are mapped
    onto the training classes by name. ``image_size`` resizes everything to a
    square once at load time. ``cache_dir`` holds decoded image folders (and the
    unpacked archive); None turns the decoded cache off. Image files of more than
    ``max_image_pixels`` pixels are refused before decoding (None: no cap). A data
    set whose training part has a single class is refused.
    """
    _check_on_bad_image(on_bad_image)
    _check_image_size(image_size)
    check_max_image_pixels(max_image_pixels)
    folder_kw = dict(im_ext=im_ext, image_size=image_size, on_bad_image=on_bad_image, num_workers=num_workers,
                     max_image_pixels=max_image_pixels)
    train, test = _load_pair(str(spec).strip(), test_dir, image_size, cache_dir, folder_kw)
    _check_two_classes(str(spec).strip(), train)
    return train, test


def _load_pair(
    key: str, test_dir: str | Path | None, image_size: int | None, cache_dir: str | Path | None, folder_kw: dict[str, Any],
) -> tuple[ImageSet, ImageSet]:
    low = key.lower()

    def folders(train_root: Path, test_root: Path, cache: str | Path | None) -> tuple[ImageSet, ImageSet]:
        train = load_image_folder(train_root, cache_dir=cache, **folder_kw)  # type: ignore[arg-type]
        test = load_image_folder(test_root, classes=train.classes, cache_dir=cache, **folder_kw)  # type: ignore[arg-type]
        return train, _match_size(test, train)

    if low == "digits":
        _no_test_dir(key, test_dir)
        return _resize_pair(*load_digits_builtin(), image_size)
    if low in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        _no_test_dir(key, test_dir)
        return _resize_pair(*load_fashion_mnist(), image_size)
    if low in ("cifar10", "cifar-10"):
        _no_test_dir(key, test_dir)
        archive = find_cifar10_archive()
        if archive is None:
            raise DataError(
                f"'{CIFAR10_ARCHIVE_NAME}' was not found (looked in {_cifar10_search_places()}); set MBDML_DATA "
                f"to the folder that holds it, or pass the path of an unpacked CIFAR-10 folder"
            )
        unpack_to = Path(cache_dir) if cache_dir is not None else Path(".cache/mbdml")
        base = unpack_cifar10_archive(archive, unpack_to)
        return folders(base / "train", base / "test", cache_dir)

    path = Path(key).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise _missing_path_error(path, "data path", f"pass one of {', '.join(DATASET_NAMES)}, or the path of a data folder")
        raise DataError(
            f"data '{key}' is neither a known data set nor an existing path; pass one of "
            f"{', '.join(DATASET_NAMES)}, or the path of a data folder"
        )
    if not path.is_dir():
        raise DataError(
            f"data path '{path}' is a file; pass a folder (class folders, train/ + test/, CIFAR pickles or IDX "
            f"files), or one of {', '.join(DATASET_NAMES)}"
        )
    if _is_class_folder_root(path / "train") and (_is_class_folder_root(path / "test") or test_dir is not None):
        test_root = Path(test_dir).expanduser() if test_dir is not None else path / "test"
        return folders(path / "train", test_root, cache_dir)
    if _is_cifar_pickle_folder(path):
        _no_test_dir(key, test_dir)
        return _resize_pair(load_cifar_pickle(path, True), load_cifar_pickle(path, False), image_size)
    if _find_idx_file(path, "train-images-idx3-ubyte") is not None:
        _no_test_dir(key, test_dir)
        return _resize_pair(*_load_idx_folder(path), image_size)
    if not _is_class_folder_root(path):
        im_ext = folder_kw["im_ext"]
        raise DataError(
            f"data folder '{path}' matches no known layout; it needs class sub-folders (<class>/<image>.{im_ext}), "
            f"train/ and test/ class folders, CIFAR python files (data_batch_1.., or train + meta) or IDX files "
            f"(train-images-idx3-ubyte[.gz] ...)"
        )
    if test_dir is None:
        raise DataError(
            f"'{path}' is a folder of class folders without a test set; pass the test folder too "
            f"(--test <folder of class folders>), or give a folder holding train/ and test/"
        )
    return folders(path, Path(test_dir).expanduser(), cache_dir)
