"""Unlabelled images as they come: a folder of images in any nesting, of any readable format.

No class folders: every image file under the folder (at any depth, any image
extension in any case: ``.jpg``, ``.JPEG``, ``.png``, ``.bmp``, ``.webp``, ...) is
one unlabelled image. Decoding follows the labelled loader
(:mod:`mbdml.data.image_folder`): the same pixel cap, bad-image policy, conversion
to RGB, resizing and on-disk cache. Hidden files and folders (a leading '.') are
left out, as are files that are not images (counted in the log).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mbdml.data.cache import cache_key, read_cache, warn_skipped, write_cache
from mbdml.data.decode import (
    DEFAULT_MAX_IMAGE_PIXELS,
    assemble,
    check_max_image_pixels,
    check_on_bad_image,
    decode_files,
    ext_names,
    normalise_ext,
    square,
)
from mbdml.data.files import IMAGE_EXTENSIONS, describe_extensions, entry_kind, missing_path_error
from mbdml.data.imageset import UnlabelledImages
from mbdml.errors import ConfigError, DataError

logger = logging.getLogger("mbdml")

__all__ = ["load_unlabelled_folder", "list_image_files"]

_CACHE_FORMAT = "mbdml-unlabelled-v1"
_FIX = "put the unlabelled images in it (in any sub-folders), or leave the folder out"


def _check_size(image_size: int | tuple[int, int] | None) -> None:
    def side(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, int) and v >= 1

    if image_size is None or side(image_size):
        return
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(side(v) for v in image_size):
        return
    raise ConfigError(
        f"image size {image_size!r} is not a positive integer or a (height, width) pair; pass --input_size 32, say"
    )


def list_image_files(root: Path, suffixes: frozenset[str]) -> list[tuple[str, str, int, int]]:
    """(relative path, absolute path, size, mtime_ns) of every image file under ``root``, sorted.

    Folder links are followed once (a folder already seen, through a link that
    loops, is not read again); links that lead nowhere and files of other
    extensions are counted in the log.
    """
    if not root.exists():
        raise missing_path_error(root, "unlabelled image folder", "check the path (--unlabelled, or the data folder's unlabelled/)")
    if not root.is_dir():
        raise DataError(f"'{root}' is a file, not a folder; pass a folder of unlabelled images (in any sub-folders)")
    found: list[tuple[str, str, int, int]] = []
    others: Counter[str] = Counter()
    bad_links = 0
    seen: set[tuple[int, int]] = set()
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        folder, rel = pending.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"cannot list folder '{folder}' ({exc}); check that it is readable") from exc
        for e in entries:
            kind = entry_kind(e)
            name = f"{rel}{e.name}"
            if kind == "dir":
                pending.append((Path(e.path), name + "/"))
            elif kind in ("loop", "broken"):
                bad_links += 1
            elif kind == "file":
                ext = os.path.splitext(e.name)[1].lower()
                if ext in suffixes:
                    s = e.stat()
                    found.append((name, e.path, s.st_size, s.st_mtime_ns))
                else:
                    others[ext] += 1
    if bad_links:
        logger.warning("left out %d link(s) under '%s' that loop or lead nowhere; fix or remove them", bad_links, root)
    if not found:
        what = f"it holds {describe_extensions(others)} files instead" if others else (
            f"it holds only {bad_links} link(s) that loop or lead nowhere" if bad_links else "it is empty")
        raise DataError(f"unlabelled image folder '{root}' holds no image files ({what}); {_FIX}")
    if others:
        logger.info(
            "left out %d file(s) under '%s' that are not images (%s)", sum(others.values()), root, describe_extensions(others)
        )
    found.sort()
    return found


def _from_cache(root: Path) -> Any:
    def build(obj: dict[str, Any]) -> tuple[UnlabelledImages, list[str]]:
        images, rel = obj["images"], obj["paths"]
        if not isinstance(images, torch.Tensor) or not isinstance(rel, list):
            raise ValueError("cache entries are not a tensor and a list of paths")
        return UnlabelledImages(images, [str(root / r) for r in rel]), list(obj.get("skipped", []))

    return build


def load_unlabelled_folder(
    root: str | Path,
    image_size: int | tuple[int, int] | None = None,
    on_bad_image: str = "error",
    cache_dir: str | Path | None = None,
    *,
    im_ext: str | None = None,
    num_workers: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> UnlabelledImages:
    """Decode every image under ``root`` (any nesting, no labels) into :class:`UnlabelledImages`.

    Which files: every extension PIL reads that image files use (``.jpg``, ``.jpeg``,
    ``.png``, ``.bmp``, ``.gif``, ``.tif``, ``.webp``, ...; any case), or only
    ``im_ext`` ('jpg' or 'jpg,png') when given. The order is the sorted relative
    paths, and ``paths`` gives each image's file. Every image becomes RGB (grey,
    palette, 16-bit and RGBA images are converted). ``image_size`` resizes every
    image to a square side, or to (height, width) — pass the labelled set's
    ``image_size`` to match it; None keeps the most common size and resizes the
    others to it. ``on_bad_image``, ``max_image_pixels``, ``num_workers`` and
    ``cache_dir`` work as in :func:`mbdml.data.image_folder.load_image_folder`.
    A missing or empty folder is a :class:`DataError` that names it.
    """
    check_on_bad_image(on_bad_image)
    _check_size(image_size)
    check_max_image_pixels(max_image_pixels)
    ext = None if im_ext is None else normalise_ext(im_ext)
    suffixes = IMAGE_EXTENSIONS if ext is None else frozenset("." + e for e in ext.split(","))
    root = Path(root).expanduser()
    try:
        root = root.resolve()
    except (OSError, RuntimeError):  # a link loop: reported below with what is wrong
        pass
    files = list_image_files(root, suffixes)
    size = square(image_size)

    cache_path: Path | None = None
    if cache_dir is not None:
        head: dict[str, Any] = {
            "format": _CACHE_FORMAT,
            "root": str(root),
            "im_ext": ext,
            "image_size": None if size is None else list(size),
            "on_bad_image": on_bad_image,
        }
        if on_bad_image == "skip":
            head["max_image_pixels"] = max_image_pixels
        key = cache_key(head, [(rel, n, mtime) for rel, _, n, mtime in files])
        cache_path = Path(cache_dir).expanduser() / f"{key}.pt"
        cached = read_cache(cache_path, _CACHE_FORMAT, _from_cache(root))
        if cached is not None:
            data, skipped = cached
            logger.debug("loaded %d unlabelled images of '%s' from cache '%s'", len(data), root, cache_path)
            warn_skipped(root, skipped)
            return data

    paths = [f[1] for f in files]
    groups, bad = decode_files(paths, size, on_bad_image, num_workers, max_image_pixels)
    skipped = [files[pos][0] for pos, _ in sorted(bad)]
    if not groups:
        which = "image" if ext is None else ext_names(ext)
        raise DataError(
            f"none of the {len(files)} {which} files under '{root}' could be read (first: '{paths[bad[0][0]]}': "
            f"{bad[0][1]}); check that they are images, or replace them"
        )
    images, ok = assemble(len(files), groups, root)
    rel_kept = [f[0] for f in files]
    if bad:
        images = images[ok].contiguous()
        rel_kept = [r for r, keep in zip(rel_kept, ok.tolist()) if keep]
        warn_skipped(root, skipped)
    data = UnlabelledImages(images, [str(root / r) for r in rel_kept])
    logger.info(
        "decoded %d unlabelled images (%dx%d, %.1f MB) from '%s'",
        len(data), data.image_size[0], data.image_size[1], images.numel() / 1e6, root,
    )
    if cache_path is not None:
        write_cache(cache_path, {"format": _CACHE_FORMAT, "images": data.images, "paths": rel_kept, "skipped": skipped})
    return data
