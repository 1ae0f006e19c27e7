"""CIFAR: the "python version" pickle folders, and the CIFAR-10 JPEG archive.

The pickles are read through the restricted unpickler of
:mod:`mbdml.data.cifar_pickle` (nothing in a file runs). The JPEG archive
(``cifar10-jpeg.tar.gz``, ``train/<class>/`` and ``test/<class>/``) is found in the
usual places, unpacked once into the cache folder with every member checked, and
read as class folders (:mod:`mbdml.data.image_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import torch

from mbdml.data.cifar_pickle import read_cifar_pickle
from mbdml.data.image_folder import load_train_test_folders
from mbdml.data.imageset import ImageSet
from mbdml.errors import ConfigError, DataError

logger = logging.getLogger("mbdml")

__all__ = [
    "CIFAR10_ARCHIVE_NAME",
    "CIFAR10_SPLITS",
    "find_cifar10_archive",
    "is_cifar_pickle_folder",
    "load_cifar10_archive",
    "load_cifar_pickle",
    "unpack_cifar10_archive",
]

CIFAR10_ARCHIVE_NAME = "cifar10-jpeg.tar.gz"
CIFAR10_SPLITS = ("train", "test")

_UNPACK_DIRNAME = "cifar10-jpeg"
_UNPACK_MARKER = ".mbdml-unpacked"


# --------------------------------------------------------------------------- CIFAR pickles


def is_cifar_pickle_folder(p: Path) -> bool:
    """Whether ``p`` (or its cifar-10-batches-py / cifar-100-python) holds CIFAR python files."""
    for cand in (p, p / "cifar-10-batches-py", p / "cifar-100-python"):
        if (cand / "data_batch_1").is_file():
            return True
        if (cand / "train").is_file() and (cand / "meta").is_file():
            return True
    return False


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


# --------------------------------------------------------------------------- the CIFAR-10 JPEG archive


def _package_repo_root() -> Path:
    # .../<repo>/src/mbdml/data/cifar.py -> <repo>
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


def load_cifar10_archive(cache_dir: str | Path | None = ".cache/mbdml", **options: Any) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 (train, test) from the JPEG archive: found (:func:`find_cifar10_archive`),
    unpacked once into ``cache_dir`` (``.cache/mbdml`` when None), read as class folders with
    ``options`` (:func:`mbdml.data.image_folder.load_image_folder`'s); ``cache_dir`` also
    holds the decoded sets (None: not cached)."""
    archive = find_cifar10_archive()
    if archive is None:
        raise DataError(
            f"'{CIFAR10_ARCHIVE_NAME}' was not found (looked in {_cifar10_search_places()}); set MBDML_DATA "
            f"to the folder that holds it, or pass the path of an unpacked CIFAR-10 folder"
        )
    unpack_to = Path(cache_dir) if cache_dir is not None else Path(".cache/mbdml")
    base = unpack_cifar10_archive(archive, unpack_to)
    return load_train_test_folders(base / "train", base / "test", cache_dir, **options)
