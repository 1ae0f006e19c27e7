"""Class-folder images (the authors' layout): ``<folder>/<class name>/<image>.<ext>``.

Listing (classes are the sorted sub-folder names, links that loop or lead nowhere
named), decoding once with the pixel cap and the bad-image policy
(:mod:`mbdml.data.decode`), and the on-disk cache of the decoded set
(:mod:`mbdml.data.cache`).
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
    check_image_size,
    check_max_image_pixels,
    check_on_bad_image,
    decode_files,
    ext_names,
    normalise_ext,
    square,
)
from mbdml.data.files import IMAGE_EXTENSIONS, describe_extensions, entry_kind, missing_path_error
from mbdml.data.imageset import ImageSet, resize_images
from mbdml.errors import DataError

logger = logging.getLogger("mbdml")

__all__ = ["load_image_folder", "load_train_test_folders"]

_CACHE_FORMAT = "mbdml-imageset-v1"


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
        raise missing_path_error(root, "image folder", "check the path (--data_dir / --test)")
    if not root.is_dir():
        raise DataError(
            f"'{root}' is a file, not a folder; pass a folder laid out as <folder>/<class name>/<image>.{im_ext}"
        )
    try:
        entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list image folder '{root}' ({exc}); check that it is readable") from exc
    kinds = {e.name: entry_kind(e) for e in entries}
    for e in entries:
        if kinds[e.name] in ("loop", "broken"):
            raise missing_path_error(root / e.name, "class folder", "move it out of the data folder")
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
                    kind = entry_kind(e)
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
            what = f"it holds {describe_extensions(others)} files instead" if others else (
                f"it holds only {links} link(s) that loop or lead nowhere" if links else "it is empty")
            fix = "pass --im_ext to match them, add images, or remove the folder" if others else "add images or remove the folder"
            raise DataError(f"class folder '{folder}' holds no {ext_names(im_ext)} images ({what}); {fix}")
        left_out.update({k: v for k, v in others.items() if k in IMAGE_EXTENSIONS})
        bad_links += links
        found.sort()
        for fname, size, mtime in found:
            files.append((f"{name}/{fname}", index[name], str(folder / fname), size, mtime))
    if left_out:
        wider = ",".join(dict.fromkeys(im_ext.split(",") + [k.lstrip(".") for k, _ in left_out.most_common()]))
        logger.warning(
            "left out %d image file(s) under '%s' whose extension is not %s (%s); to use them too, pass --im_ext %s",
            sum(left_out.values()), root, ext_names(im_ext), describe_extensions(left_out), wider,
        )
    if bad_links:
        logger.warning("left out %d link(s) under '%s' that loop or lead nowhere; fix or remove them", bad_links, root)
    return class_list, files


def _cache_key(
    root: Path, im_ext: str, image_size: int | None, classes: list[str] | None, on_bad_image: str,
    files: list[tuple[str, int, str, int, int]], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> str:
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
    return cache_key(head, [(rel, size, mtime) for rel, _, _, size, mtime in files])


def _from_cache(obj: dict[str, Any]) -> tuple[ImageSet, list[str]]:
    images, labels, classes = obj["images"], obj["labels"], obj["classes"]
    skipped = list(obj.get("skipped", []))
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("cache entries are not tensors")
    return ImageSet(images, labels, list(classes)), skipped


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
    check_on_bad_image(on_bad_image)
    check_image_size(image_size)
    check_max_image_pixels(max_image_pixels)
    ext = normalise_ext(im_ext)
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
        cached = read_cache(cache_path, _CACHE_FORMAT, _from_cache)
        if cached is not None:
            data, skipped = cached
            logger.debug("loaded %d images of '%s' from cache '%s'", len(data), root, cache_path)
            warn_skipped(root, skipped)
            return data

    paths = [f[2] for f in files]
    labels_all = torch.tensor([f[1] for f in files], dtype=torch.int64)
    groups, bad = decode_files(paths, square(image_size), on_bad_image, num_workers, max_image_pixels)
    skipped = [files[pos][0] for pos, _ in sorted(bad)]
    if not groups:
        raise DataError(
            f"none of the {len(files)} {ext_names(ext)} files under '{root}' could be read (first: '{paths[bad[0][0]]}': "
            f"{bad[0][1]}); check that they are images, or pass --im_ext to match your files"
        )
    images, ok = assemble(len(files), groups, root)
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
        warn_skipped(root, skipped)
    data = ImageSet(images, labels_all, class_list)
    logger.info(
        "decoded %d images (%d classes, %dx%d, %.1f MB) from '%s'",
        len(data), data.num_classes, data.image_size[0], data.image_size[1], images.numel() / 1e6, root,
    )
    if cache_path is not None:
        write_cache(cache_path, {
            "format": _CACHE_FORMAT,
            "images": data.images,
            "labels": data.labels,
            "classes": list(data.classes),
            "skipped": list(skipped),
        })
    return data


def _match_size(test: ImageSet, train: ImageSet) -> ImageSet:
    if test.image_size == train.image_size:
        return test
    logger.info(
        "test images are %dx%d, training images %dx%d; resizing the test images to match",
        *test.image_size, *train.image_size,
    )
    return ImageSet(resize_images(test.images, train.image_size), test.labels, test.classes)


def load_train_test_folders(
    train_root: str | Path, test_root: str | Path, cache_dir: str | Path | None = None, **options: Any,
) -> tuple[ImageSet, ImageSet]:
    """(train, test) from two folders of class folders: the test classes are mapped onto the
    training classes by name, and test images of another size are resized to the training
    size. ``options`` are :func:`load_image_folder`'s (im_ext, image_size, on_bad_image, ...)."""
    train = load_image_folder(train_root, cache_dir=cache_dir, **options)
    test = load_image_folder(test_root, classes=train.classes, cache_dir=cache_dir, **options)
    return train, _match_size(test, train)
