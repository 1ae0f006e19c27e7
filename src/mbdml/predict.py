"""Classify image files with a trained run: ``mbdml predict RUN PATH...``.

    mbdml predict runs/mbdml2-digits-seed0-run0 photos/ extra.png --out predictions.csv

The images are read the way ``mbdml train`` reads a folder of images (any of the
readable formats, 16-bit and palette images included, the ``--max_image_pixels`` cap
before decoding), then brought to the run's image shape (``LoadedRun.image_shape``,
the (C, H, W) it trained on): resized with PIL's bilinear filter, as the training
folders were, and made grey for a grey run (a run trained on 8x8 digits classifies
colour photos as 8x8 grey images; the final message counts the images converted so).
They are classified as the run is evaluated: the network in eval mode on the run's
normalisation, flip averaging for ``--tta_flip`` runs
(:func:`mbdml.evaluate.compute_embeddings`), then the run's kernel classifier over its
stored centres (``NNGKClassifier.predict_log_proba``: the K nearest centres). This is
what ``mbdml export`` writes into its one-file program, and it computes in float32 as
that program does.

The CSV has one row per readable image: ``file``, the predicted ``class`` and its
``probability``, the next two classes (``class_2``, ``probability_2``, ``class_3``,
``probability_3``; empty for a run of two classes) and ``uncertain`` (true where the
probability is below ``min_confidence``).

Folders are listed as ``--unlabelled`` folders are (:func:`mbdml.data.unlabelled.list_image_files`),
and files decoded as every loader decodes them (:func:`mbdml.data.decode.decode_one`), but
a batch at a time, so that memory stays bounded however many images there are.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .data.decode import DEFAULT_MAX_IMAGE_PIXELS, bad_image_error, check_max_image_pixels, check_on_bad_image, decode_one
from .data.files import IMAGE_EXTENSIONS
from .data.unlabelled import list_image_files
from .errors import ConfigError, DataError
from .evaluate import compute_embeddings
from .progress import progress_bar

log = logging.getLogger("mbdml")

RUN_CAP = "run"  # max_image_pixels: the cap the run was trained with
DEFAULT_MIN_CONFIDENCE = 0.5
DEFAULT_BATCH_SIZE = 256
TOP_CLASSES = 3


# ----------------------------------------------------------------- the run
def open_run(run_dir: str | Path, which: str = "best", device: str = "auto") -> Any:
    """The saved run of ``run_dir`` (``which``: best or last checkpoint) on ``device``
    ('auto': a GPU when there is one), as ``mbdml.components.load_run`` reads it back."""
    from .components import load_run
    from .environment import resolve_device

    if which not in ("best", "last"):
        raise ConfigError(f"which={which!r} is not a checkpoint; pass --which best or --which last")
    return load_run(run_dir, which, device=str(resolve_device(device)))


def run_image_shape(run: Any, image_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the images ``run`` trained on; ``image_size`` (the side in pixels)
    only for runs saved before mbdml recorded it."""
    if run.image_shape is not None:
        return tuple(int(v) for v in run.image_shape)  # type: ignore[return-value]
    if image_size is None:
        raise ConfigError(
            "the run was saved before mbdml recorded the size of its images; pass --image_size N "
            "(the side in pixels of the images it trained on)"
        )
    if image_size < 1:
        raise ConfigError(f"--image_size {image_size} is not a positive number of pixels; pass the side of the training images")
    first_conv = next((p for p in run.model.parameters() if p.dim() == 4), None)
    if first_conv is None:
        raise ConfigError("the run's model holds no convolution; it was not written by mbdml")
    return int(first_conv.shape[1]), int(image_size), int(image_size)


# ----------------------------------------------------------------- finding the files
def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``paths``: a file as it is (whatever its extension), a
    folder searched at any depth for files of an image extension (``.jpg``, ``.PNG``,
    ``.webp``, ...; case does not matter; hidden files and folders left out).

    Files come in the order of ``paths``, each folder's sorted by path; a file named
    twice is listed once. A missing path or a folder without images is an error.
    """
    if not paths:
        raise ConfigError("no image or folder given; name at least one image file or folder")
    out: list[Path] = []
    seen: set[str] = set()
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists():
            why = "is a symbolic link to nothing" if p.is_symlink() else "does not exist"
            raise DataError(f"'{given}' {why}; check the path (an image file or a folder of images)")
        found = [p] if p.is_file() else [Path(f[1]) for f in list_image_files(p, IMAGE_EXTENSIONS)] if p.is_dir() else None
        if found is None:
            raise DataError(f"'{given}' is neither a file nor a folder; name image files or folders of images")
        for f in found:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


# ----------------------------------------------------------------- reading the files
@dataclass
class ReadImages:
    """Image files decoded to a run's shape: ``images`` uint8 (N, C, H, W) of ``files``
    (the readable ones, in order); ``skipped``, the unreadable ones left out; how many
    were ``resized`` and, for a grey run, how many colour images were ``made_grey``."""

    images: torch.Tensor
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)
    resized: int = 0
    made_grey: int = 0


def read_images(
    files: Sequence[Path],
    image_shape: tuple[int, int, int],
    *,
    on_bad_image: str = "error",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> ReadImages:
    """Decode ``files`` and bring them to ``image_shape`` (C, H, W): resized with PIL's
    bilinear filter (as ``mbdml train`` resizes a folder's images), made grey (PIL's
    luma) when C is 1. An unreadable file raises a DataError naming it, or with
    ``on_bad_image="skip"`` is left out and listed in ``skipped``."""
    from PIL import Image

    check_on_bad_image(on_bad_image)
    check_max_image_pixels(max_image_pixels)
    c, h, w = image_shape
    if c not in (1, 3):
        raise ConfigError(f"the run takes images of {c} channels; mbdml reads files as grey (1) or colour (3) images")
    out = ReadImages(torch.empty((len(files), c, h, w), dtype=torch.uint8), [])
    for path in files:
        try:
            rgb = decode_one(str(path), None, max_image_pixels)  # (H, W, 3) uint8
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
            if on_bad_image == "error":
                raise bad_image_error(str(path), f"{type(exc).__name__}: {exc}") from None
            out.skipped.append(path)
            continue
        im = Image.fromarray(rgb)
        if rgb.shape[:2] != (h, w):
            im = im.resize((w, h), Image.BILINEAR)
            out.resized += 1
        if c == 1:
            out.made_grey += int(not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])))
            arr = np.asarray(im.convert("L"), dtype=np.uint8)[None]
        else:
            arr = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        out.images[len(out.files)] = torch.from_numpy(np.array(arr, dtype=np.uint8))  # a writable copy
        out.files.append(path)
    out.images = out.images[: len(out.files)].contiguous()
    return out


# ----------------------------------------------------------------- classifying
@torch.no_grad()
def classify_images(run: Any, images: torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N, D) and class probabilities (N, num_classes), float32 on the run's
    device, of uint8 ``images`` at the run's shape: the run's normalisation and flip
    averaging, then its kernel classifier over the K nearest of its centres."""
    cfg = run.config
    device = run.kernel.centres.device
    emb = compute_embeddings(
        run.model, images, batch_size=batch_size, device=device, mean=tuple(cfg.mean), std=tuple(cfg.std),
        channels_last=bool(cfg.channels_last), flip_average=bool(cfg.tta_flip),
    )
    if images.shape[0] == 0:
        return emb, torch.zeros(0, int(run.kernel.num_classes), device=device)
    return emb, run.kernel.predict_log_proba(emb).exp()


@dataclass
class Classified:
    """What :func:`classify_files` found: per readable file, its class probabilities
    (N, num_classes), and its embedding (N, D) when asked for; the class names; the
    files left out and how many images were converted to the run's shape."""

    files: list[Path]
    probabilities: torch.Tensor
    classes: list[str]
    embeddings: torch.Tensor | None = None
    skipped: list[Path] = field(default_factory=list)
    resized: int = 0
    made_grey: int = 0
    image_shape: tuple[int, int, int] = (0, 0, 0)

    @property
    def conversions(self) -> str:
        """'; 12 resized to 8x8, 3 made grey' (empty when nothing was converted), for messages."""
        _, h, w = self.image_shape
        parts = ([f"{self.resized} resized to {h}x{w}"] if self.resized else []) + (
            [f"{self.made_grey} colour image(s) made grey"] if self.made_grey else [])
        return "".join(f"; {p}" for p in parts)


def classify_files(
    run: Any,
    paths: Sequence[str | Path],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_bad_image: str = "error",
    max_image_pixels: int | None | str = RUN_CAP,
    image_size: int | None = None,
    keep_embeddings: bool = False,
    progress: bool = False,
) -> Classified:
    """Class probabilities (and, with ``keep_embeddings``, embeddings) of the image files
    and folders ``paths`` under a loaded ``run``, ``batch_size`` files at a time.

    ``max_image_pixels``: the cap on pixels per file, by default the run's own.
    ``progress`` draws a bar, on a terminal only (a redirected log gets none).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch_size {batch_size} is not a positive whole number; pass 256, say")
    check_on_bad_image(on_bad_image)
    cap = run.config.max_image_pixels if max_image_pixels == RUN_CAP else max_image_pixels
    check_max_image_pixels(cap)  # type: ignore[arg-type]
    shape = run_image_shape(run, image_size)
    files = image_files(paths)
    classes = list(run.classes or [str(c) for c in range(int(run.kernel.num_classes))])
    probs: list[torch.Tensor] = []
    embs: list[torch.Tensor] = []
    result = Classified([], torch.zeros(0), classes, image_shape=shape)
    bar = progress_bar(desc="images", enabled=progress, total=len(files), unit="image")
    try:
        for chunk in _chunks(files, batch_size):
            read = read_images(chunk, shape, on_bad_image=on_bad_image, max_image_pixels=cap)  # type: ignore[arg-type]
            emb, p = classify_images(run, read.images, batch_size=batch_size)
            probs.append(p.cpu())
            if keep_embeddings:
                embs.append(emb.cpu())
            result.files += read.files
            result.skipped += read.skipped
            result.resized += read.resized
            result.made_grey += read.made_grey
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if not result.files:
        raise DataError(
            f"none of the {len(files)} image file(s) could be read (first: '{result.skipped[0]}'); "
            "check that they are images"
        )
    result.probabilities = torch.cat(probs)
    if keep_embeddings:
        result.embeddings = torch.cat(embs)
    if result.skipped:
        log.warning("skipped %d unreadable image file(s) (for example '%s')", len(result.skipped), result.skipped[0])
    return result


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict(
    run_dir: str | Path,
    paths: Sequence[str | Path],
    *,
    which: str = "best",
    device: str = "auto",
    **options: Any,
) -> Classified:
    """Load the run of ``run_dir`` and classify the image files and folders ``paths``;
    ``options`` as :func:`classify_files` takes them."""
    return classify_files(open_run(run_dir, which, device), paths, **options)


# ----------------------------------------------------------------- the CSV
PREDICTION_COLUMNS = ("file", "class", "probability", "class_2", "probability_2", "class_3", "probability_3", "uncertain")


def check_min_confidence(min_confidence: float) -> None:
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise ConfigError(f"--min_confidence {min_confidence} is not a probability; pass a number from 0 to 1, e.g. 0.5")


def prediction_rows(result: Classified, min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> list[dict[str, str]]:
    """One row per file (the columns of :data:`PREDICTION_COLUMNS`), probabilities to 6 decimals."""
    check_min_confidence(min_confidence)
    k = min(TOP_CLASSES, result.probabilities.shape[1])
    top_p, top_c = result.probabilities.topk(k, dim=1)
    rows = []
    for i, f in enumerate(result.files):
        row = {"file": str(f), "uncertain": str(bool(top_p[i, 0] < min_confidence)).lower()}
        for j, (cname, pname) in enumerate((("class", "probability"), ("class_2", "probability_2"), ("class_3", "probability_3"))):
            row[cname] = result.classes[int(top_c[i, j])] if j < k else ""
            row[pname] = f"{float(top_p[i, j]):.6f}" if j < k else ""
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, str]], columns: Sequence[str], out: str | Path) -> Path:
    """Write ``rows`` as a CSV file at ``out``, atomically (a failed write leaves no partial file)."""
    from .checkpoint import atomic_write

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a file, e.g. {out / 'predictions.csv'}")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"cannot write {out}: {blocking} is a file, not a folder; give another --out path")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out, lambda f: f.write(text.getvalue().encode("utf-8")), fix="pass another --out")
    return out


def write_predictions(result: Classified, out: str | Path, min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> Path:
    """The prediction CSV of ``result`` (see the module docstring) at ``out``."""
    return write_csv(prediction_rows(result, min_confidence), PREDICTION_COLUMNS, out)
