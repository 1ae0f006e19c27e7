"""Self-training: a finished run (the teacher) labels the unlabelled images, and a new
run (the student) trains on the labelled images and the teacher's surest pseudo-labels
as if they were labelled.

The semi-supervised methods (``mbdml_semi``, ``mbdml1_semi``) label the unlabelled images
while they train and draw a few of them per labelled image at each step. Here the
labelling happens once, before training, with the teacher's final model (its kernel
classifier over its own centres, or its mixup head: ``--pseudo_labeller``), and every
kept image is then an ordinary training image of any method, seen once per epoch like
the labelled ones. The images are kept by rank, balanced per class
(``--teacher_fraction``), or by ``--pseudo_threshold``.

The teacher must have been trained on the same labelled split (data set, labelled
fraction, seed, split, fold, validation fraction) and image size: its centres are
checked against the student's labelled images. The validation and test images are
never labelled by the teacher. The hidden true labels of the unlabelled images serve
only the logged accuracy of the pseudo-labels.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .distributed import SINGLE, DistContext, all_gather_rows
from .errors import CheckpointError, ConfigError
from .evaluate import compute_embeddings
from .precision import resolve_amp

log = logging.getLogger("mbdml")

# Fields that decide which images are labelled, and how they are stored: a teacher must share them.
SPLIT_FIELDS = ("dataset", "test_dir", "labelled_fraction", "seed", "split", "run", "val_fraction", "input_size")

LABELS_FILE = "teacher_labels.pt"


@dataclass
class TeacherLabels:
    """The teacher's pseudo-labels for the kept unlabelled images."""

    indices: torch.Tensor  # into the unlabelled set, ascending
    labels: torch.Tensor
    confidence: torch.Tensor
    unlabelled_count: int
    teacher: str
    seconds: float = 0.0

    def stats(self, true_labels: torch.Tensor | None) -> dict[str, Any]:
        """Counts for the log and summary: how many were kept, and how many are right."""
        n = int(self.indices.numel())
        right = None
        if true_labels is not None and n:
            right = float((true_labels[self.indices] == self.labels).float().mean())
        return {
            "teacher": self.teacher,
            "teacher_n": n,
            "teacher_fraction_kept": n / max(1, self.unlabelled_count),
            "teacher_label_acc": right,
            "teacher_min_conf": float(self.confidence.min()) if n else None,
            "teacher_s": self.seconds,
        }

    def save(self, path: str | Path) -> None:
        torch.save({"indices": self.indices, "labels": self.labels, "confidence": self.confidence,
                    "unlabelled_count": self.unlabelled_count, "teacher": self.teacher, "seconds": self.seconds}, path)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherLabels":
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return cls(d["indices"], d["labels"], d["confidence"], int(d["unlabelled_count"]), str(d["teacher"]), float(d["seconds"]))
        except (OSError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the teacher's pseudo-labels in {path} ({exc}); delete it to label again") from None


def check_teacher_config(teacher: RunConfig, student: RunConfig, teacher_dir: str | Path) -> None:
    """Refuse a teacher trained on another labelled split or image size."""
    differ = [f"{name} {getattr(teacher, name)!r} (the student: {getattr(student, name)!r})"
              for name in SPLIT_FIELDS if getattr(teacher, name) != getattr(student, name)]
    if differ:
        raise ConfigError(
            f"the teacher {teacher_dir} was trained on another labelled split or image size: " + "; ".join(differ)
            + ". Train the student with the teacher's values, or train a teacher on this split (in 'mbdml compare', "
            "where each run draws its own split, name each run's teacher with {run} or {seed} in --teacher)"
        )


def select_pseudo_labels(confidence: torch.Tensor, labels: torch.Tensor, num_classes: int, fraction: float | None, threshold: float) -> torch.Tensor:
    """Mask of the kept images: per predicted class, its surest images up to ``fraction``
    of the set over the classes (see :func:`mbdml.train.select_by_rank`), or, with no
    fraction, those whose confidence reaches ``threshold``."""
    from .train import select_by_rank

    if fraction is None:
        return confidence >= threshold
    return select_by_rank(confidence, labels, num_classes, fraction)


@torch.no_grad()
def label_with_teacher(cfg: RunConfig, data: Any, device: torch.device, block: int = 4096, dist: DistContext = SINGLE) -> TeacherLabels:
    """Label ``data.unlabelled`` with the teacher run ``cfg.teacher`` (its final model).

    The teacher's centres are its labelled training images as embedded at the end of
    its run; they must be the student's labelled images (same count and labels, in
    order), which catches a teacher trained on another split even when its
    configuration file was edited. With several processes (``dist``) each embeds and
    labels its shard of the unlabelled images and the results are gathered, so every
    process keeps the same images.
    """
    from .train import labeller_probabilities, load_run

    t0 = time.perf_counter()
    teacher_dir = Path(str(cfg.teacher))
    if not (teacher_dir / "last.pt").is_file():
        raise ConfigError(
            f"--teacher {teacher_dir}: no finished run there (no last.pt); pass the folder of a run written by 'mbdml train'"
        )
    teacher = load_run(teacher_dir, which="last", device=str(device))
    check_teacher_config(teacher.config, cfg, teacher_dir)
    if teacher.epoch < teacher.config.max_epochs:
        log.warning(
            "the teacher %s stopped after epoch %d of %d: its model of that epoch labels the images, with the centres of "
            "its last refresh; finish it first with 'mbdml train --resume %s' for the final model",
            teacher_dir, teacher.epoch, teacher.config.max_epochs, teacher_dir,
        )
    kernel = teacher.kernel
    centre_labels = kernel.centre_labels.cpu()
    if centre_labels.numel() != len(data.train) or not torch.equal(centre_labels, data.train.labels):
        raise ConfigError(
            f"the teacher {teacher_dir} holds {centre_labels.numel()} centres that are not the student's "
            f"{len(data.train)} labelled training images; the teacher must be trained on the same split"
        )
    if int(kernel.num_classes) != len(data.classes):
        raise ConfigError(f"the teacher {teacher_dir} has {int(kernel.num_classes)} classes and the data {len(data.classes)}")
    unl = data.unlabelled
    if unl is None or len(unl) == 0:
        raise ConfigError("--teacher needs unlabelled images to label; with --labelled_fraction 1 every image is labelled already")
    tcfg = teacher.config
    head = getattr(teacher.method, "head", None)
    if cfg.pseudo_labeller in ("head", "mean") and head is None:
        raise ConfigError(
            f"--pseudo_labeller {cfg.pseudo_labeller} reads the teacher's mixup head, and the teacher ({tcfg.method}) has none; "
            "use --pseudo_labeller kernel or kernel_all"
        )
    # the student's precision (--amp, for this machine), whatever the teacher trained in
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolve_amp(cfg.amp, device, warn=False) == "bf16")
    conf_all, lab_all = [], []
    part = dist.shard(len(unl))
    for start in range(part.start, part.stop, block):
        with autocast:
            emb = compute_embeddings(
                teacher.model, unl.images[start : min(start + block, part.stop)], batch_size=max(256, tcfg.batch_size), device=device,
                mean=tcfg.mean, std=tcfg.std, channels_last=tcfg.channels_last, flip_average=tcfg.tta_flip,
            )
        probs = labeller_probabilities(cfg.pseudo_labeller, kernel, emb, kernel.neighbours(emb), head)
        conf, lab = probs.max(1)
        conf_all.append(conf.cpu())
        lab_all.append(lab.cpu())
    conf = all_gather_rows(torch.cat(conf_all) if conf_all else torch.zeros(0), dist)
    lab = all_gather_rows(torch.cat(lab_all) if lab_all else torch.zeros(0, dtype=torch.long), dist)
    keep = select_pseudo_labels(conf, lab, len(data.classes), cfg.teacher_fraction, cfg.pseudo_threshold)
    idx = keep.nonzero().reshape(-1)
    return TeacherLabels(idx, lab[idx], conf[idx], len(unl), str(teacher_dir), time.perf_counter() - t0)


def with_teacher_labels(data: Any, labels: TeacherLabels) -> Any:
    """The data with the kept unlabelled images appended to the labelled training images
    (with the teacher's labels); the rest stay unlabelled."""
    from .data.sources import ImageSet

    unl = data.unlabelled
    if labels.unlabelled_count != len(unl) or (labels.indices.numel() and int(labels.indices.max()) >= len(unl)):
        raise CheckpointError(
            f"the saved teacher labels are for {labels.unlabelled_count} unlabelled images, and this split has {len(unl)}; "
            f"delete {LABELS_FILE} from the run folder to label again"
        )
    kept = unl.images[labels.indices]
    train = ImageSet(torch.cat([data.train.images, kept]), torch.cat([data.train.labels, labels.labels]), list(data.classes))
    rest = torch.ones(len(unl), dtype=torch.bool)
    rest[labels.indices] = False
    return dataclasses.replace(data, train=train, unlabelled=unl.subset(rest), unlabelled_count=int(rest.sum()))


def apply_teacher(cfg: RunConfig, data: Any, device: torch.device, run_dir: Path, reuse: bool = False, dist: DistContext = SINGLE) -> tuple[Any, dict[str, Any]]:
    """Label with the teacher and return the student's data and the labelling's
    statistics. The labels are saved in the run folder (by the main process); a
    resumed run (``reuse``) reads them back instead of labelling again."""
    path = run_dir / LABELS_FILE
    if reuse and path.is_file():
        labels = TeacherLabels.load(path)
    else:
        labels = label_with_teacher(cfg, data, device, dist=dist)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            labels.save(path)
    stats = labels.stats(data.unlabelled.labels)
    log.info(
        "teacher %s labelled %d of %d unlabelled images (%.1f%%), %s right, in %.1fs",
        labels.teacher, stats["teacher_n"], labels.unlabelled_count, 100 * stats["teacher_fraction_kept"],
        "?" if stats["teacher_label_acc"] is None else f"{100 * stats['teacher_label_acc']:.2f}%", labels.seconds,
    )
    return with_teacher_labels(data, labels), stats
