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

With ``--teacher_epochs N`` both stages are one run: the method first trains N epochs on
the labelled images alone (the teacher, a run of its own in the run folder's
``teacher/``), labels, and the student then trains for ``--max_epochs``. The teacher's
frozen-stage features of the images it embedded (the unlabelled ones for the labelling,
the labelled, validation and test ones for its refreshes and evaluation) are handed to
the student, whose frozen stages are the same pretrained ones: with ``--freeze_stages``
the student does not compute them again.

The teacher must have been trained on the same labelled split (data set, labelled
fraction, seed, split, fold, validation fraction) and image size: its centres are
checked against the student's labelled images. The validation and test images are
never labelled by the teacher. The hidden true labels of the unlabelled images serve
only the logged accuracy of the pseudo-labels.

:class:`SelfTraining` is this as an algorithm on the engine (:class:`mbdml.engine.Trainer`):
the teacher stage and the labelling before the student's first epoch, the student's
start from its teacher once its network is built. The teacher labels with the
:class:`~mbdml.pseudo_labels.PseudoLabeller` the semi-supervised methods use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .components import load_run
from .config import RunConfig
from .data import ImageSet
from .distributed import SINGLE, DistContext
from .embedder import Embedder
from .engine import Algorithm, Trainer
from .environment import resolve_device
from .errors import CheckpointError, ConfigError
from .feature_cache import FrozenFeatureCache, same_frozen_stages
from .kernel import NNGKClassifier
from .methods import METHODS
from .models import EmbeddingNet
from .pseudo_labels import PseudoLabeller, pseudo_label_accuracy, select_pseudo_labels
from .precision import resolve_amp
from .training_data import PreparedData

log = logging.getLogger("mbdml")

# Fields that decide which images are labelled, and how they are stored: a teacher must share them.
SPLIT_FIELDS = ("dataset", "test_dir", "labelled_fraction", "seed", "split", "run", "val_fraction", "input_size")

LABELS_FILE = "teacher_labels.pt"
TEACHER_DIR = "teacher"  # the teacher stage's run folder inside a --teacher_epochs run


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
        right = None if true_labels is None else pseudo_label_accuracy(true_labels[self.indices], self.labels)
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


@dataclass
class Teacher:
    """A trained model ready to label: its network, its kernel classifier (centres set
    on its labelled images), its mixup head if any, and a cache of its frozen-stage
    features (shared with the student when their frozen stages are the same)."""

    name: str
    config: RunConfig
    model: EmbeddingNet
    kernel: NNGKClassifier
    head: torch.nn.Module | None = None
    cache: FrozenFeatureCache | None = None


def _teacher_cache(teacher_cfg: RunConfig, student_cfg: RunConfig, model: EmbeddingNet, device: torch.device) -> FrozenFeatureCache:
    return FrozenFeatureCache(
        model, max_bytes=int(student_cfg.frozen_cache_gb * 2**30), batch_size=max(256, teacher_cfg.batch_size), device=device,
        mean=teacher_cfg.mean, std=teacher_cfg.std, channels_last=teacher_cfg.channels_last,
    )


def load_teacher(cfg: RunConfig, data: PreparedData, device: torch.device) -> Teacher:
    """Read the finished run ``cfg.teacher`` back (its final model) and check that it was
    trained on the student's labelled split.

    Its centres must be the student's labelled images (same count and labels, in
    order), which catches a teacher trained on another split even when its
    configuration file was edited.
    """
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
    model = teacher.model  # in the memory format it trained in: the same kernels, so the same features as a student's
    return Teacher(str(teacher_dir), teacher.config, model, kernel, getattr(teacher.method, "head", None),
                   _teacher_cache(teacher.config, cfg, model, device))


def teacher_config(cfg: RunConfig) -> RunConfig:
    """The configuration of the teacher stage of a one-run self-training (``--teacher_epochs``):
    the student's, trained ``teacher_epochs`` epochs on the labelled images alone,
    evaluated at its end."""
    n = int(cfg.teacher_epochs)
    return dataclasses.replace(cfg, max_epochs=n, eval_every=n, teacher=None, teacher_epochs=None, unlabelled=None,
                               student_init="pretrained", name="teacher", tsne_graph=False)


def train_teacher(cfg: RunConfig, data: PreparedData, run_dir: Path) -> Teacher:
    """The teacher stage of ``--teacher_epochs``: train the method on the labelled images
    in ``run_dir/teacher`` (a run of its own, resumed after an interruption, read back
    once finished) and return it, ready to label."""
    tcfg = teacher_config(cfg)
    tdir = run_dir / TEACHER_DIR
    summary_path = tdir / "summary.json"
    if summary_path.is_file() and (tdir / "last.pt").is_file():
        log.info("the teacher in %s has finished; it labels the unlabelled images", tdir)
        return load_teacher(dataclasses.replace(cfg, teacher=str(tdir)), data, resolve_device(cfg.device))
    resume = (tdir / "last.pt").is_file()
    log.info("%s the teacher: %s for %d epochs on the %d labelled images, in %s",
             "resuming" if resume else "training", cfg.method, tcfg.max_epochs, len(data.train), tdir)
    trainer = Trainer(tcfg, data=data, run_dir=tdir, resume=resume)
    trainer.run()
    trainer.model.eval()
    trainer.method.eval()
    return Teacher(str(tdir), trainer.cfg, trainer.model, trainer.kernel, getattr(trainer.method, "head", None), trainer.frozen_cache)


@torch.no_grad()
def label_unlabelled(teacher: Teacher, cfg: RunConfig, data: PreparedData, device: torch.device, block: int = 4096,
                     dist: DistContext = SINGLE) -> TeacherLabels:
    """Label ``data.unlabelled`` with ``teacher`` by ``cfg.pseudo_labeller`` and keep the
    surest (``--teacher_fraction``, or ``--pseudo_threshold``).

    The teacher embeds the images as it trained (its normalisation, flips, memory
    format), in the student's precision (``--amp``, for this machine). With several
    processes (``dist``) each embeds and labels its shard of the unlabelled images and
    the results are gathered, so every process keeps the same images. With one process
    and frozen stages, the images go through the teacher's frozen-stage cache, where the
    student can pick their features up (:func:`student_features`).
    """
    t0 = time.perf_counter()
    unl = data.unlabelled
    if unl is None or len(unl) == 0:
        raise ConfigError(
            "self-training needs unlabelled images to label, and this run has none: give a folder of them "
            "(--unlabelled DIR, or unlabelled/ beside train/ and test/), or hide labels (--labelled_fraction below 1)"
        )
    tcfg, head = teacher.config, teacher.head
    if cfg.pseudo_labeller in ("head", "mean") and head is None:
        raise ConfigError(
            f"--pseudo_labeller {cfg.pseudo_labeller} reads the teacher's mixup head, and the teacher ({tcfg.method}) has none; "
            "use --pseudo_labeller kernel or kernel_all"
        )
    amp = resolve_amp(cfg.amp, device, warn=False)
    embedder = Embedder.for_run(teacher.model, tcfg, device, amp=amp, cache=None if dist.enabled else teacher.cache)
    labelled = PseudoLabeller(cfg.pseudo_labeller, teacher.kernel, head).label(unl.images, embedder, block=block, dist=dist, keep_neighbours=False)
    conf, lab = labelled.confidence.cpu(), labelled.labels.cpu()
    keep = select_pseudo_labels(conf, lab, len(data.classes), cfg.teacher_fraction, cfg.pseudo_threshold)
    idx = keep.nonzero().reshape(-1)
    return TeacherLabels(idx, lab[idx], conf[idx], len(unl), teacher.name, time.perf_counter() - t0)


def label_with_teacher(cfg: RunConfig, data: PreparedData, device: torch.device, block: int = 4096, dist: DistContext = SINGLE) -> TeacherLabels:
    """Label ``data.unlabelled`` with the finished run ``cfg.teacher`` (its final model)."""
    return label_unlabelled(load_teacher(cfg, data, device), cfg, data, device, block=block, dist=dist)


@dataclass
class SharedFeatures:
    """Frozen-stage features the teacher computed, for the student's cache: per image
    tensor of the student's data, the features of the images and of their mirror images."""

    teacher_model: Any
    teacher_config: RunConfig
    entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

    def give_to(self, cache: FrozenFeatureCache, student_cfg: RunConfig) -> int:
        """Put the features into the student's ``cache`` when its model's frozen stages are
        the teacher's, on the same normalised input; returns how many image sets were kept."""
        t = self.teacher_config
        if not (cache.enabled and (t.mean, t.std, t.input_size, t.amp) == (student_cfg.mean, student_cfg.std, student_cfg.input_size, student_cfg.amp)
                and same_frozen_stages(self.teacher_model, cache.model)):
            return 0
        return sum(cache.put(images, plain, flipped) for images, plain, flipped in self.entries)


def student_features(teacher: Teacher, data: PreparedData, student_data: PreparedData, labels: TeacherLabels) -> SharedFeatures | None:
    """The teacher's kept frozen features of the student's training images (the labelled
    ones and the kept unlabelled ones, in the student's order) and of the validation and
    test images, so that the student does not compute them again; None when the teacher
    kept none of the unlabelled images' features."""
    cache = teacher.cache
    if cache is None or not cache.enabled:
        return None
    flip = teacher.config.tta_flip
    unl = data.unlabelled.images
    unl_plain, unl_flipped = cache.peek(unl), cache.peek(unl, flipped=True) if flip else None
    if unl_plain is None or (flip and unl_flipped is None):
        return None
    entries = []
    with torch.no_grad(), torch.autocast(device_type=cache.device.type, dtype=unl_plain.dtype, enabled=unl_plain.dtype == torch.bfloat16):
        lab_plain = cache.features(data.train.images)
        lab_flipped = cache.features(data.train.images, flipped=True) if flip else None
    if lab_plain is not None and (lab_flipped is not None or not flip):
        idx = labels.indices.to(unl_plain.device)
        plain = torch.cat([lab_plain, unl_plain[idx]])
        flipped = torch.cat([lab_flipped, unl_flipped[idx]]) if flip else None
        entries.append((student_data.train.images, plain, flipped))
    for images in (data.val.images, data.test.images):
        plain = cache.peek(images)
        flipped = cache.peek(images, flipped=True) if flip else None
        if plain is not None and (flipped is not None or not flip):
            entries.append((images, plain, flipped))
    cache.clear()  # the teacher's copies; the student keeps what it needs
    return SharedFeatures(teacher.model, teacher.config, entries) if entries else None


def teacher_folder(cfg: RunConfig, run_dir: Path) -> Path:
    """The teacher's run folder: ``--teacher``, or the teacher stage of ``--teacher_epochs``."""
    return Path(str(cfg.teacher)) if cfg.teacher is not None else Path(run_dir) / TEACHER_DIR


def start_from_teacher(model: torch.nn.Module, method: torch.nn.Module, cfg: RunConfig, run_dir: Path) -> list[str]:
    """``--student_init teacher``: copy the teacher's final network, and its method's
    weights other than the kernel's (the mixup head), into the student's ``model`` and
    ``method``. The kernel's per-centre weights start afresh: the student has more
    centres. Returns the method weights copied; the networks must be the same."""
    from .checkpoint import check_model_state, load_checkpoint

    tdir = teacher_folder(cfg, run_dir)
    state = load_checkpoint(tdir / "last.pt", map_location="cpu")
    check_model_state(state, tdir / "last.pt", fix="pass the folder of a run written by 'mbdml train' as --teacher")
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--student_init teacher: the network of the teacher {tdir} is not the student's ({first}); give the student "
            "the teacher's --model, --width, --embedding_dim and --freeze_stages, or use --student_init pretrained"
        ) from None
    own = method.state_dict()
    theirs = {k: v for k, v in state.get("method", {}).items() if not k.startswith("kernel.")}
    copied = sorted(k for k, v in theirs.items() if k in own and own[k].shape == v.shape)
    method.load_state_dict({k: theirs[k] for k in copied}, strict=False)
    left = sorted(k for k in own if not k.startswith("kernel.") and k not in copied)
    if left:
        log.warning("--student_init teacher: the teacher %s has no %s of this shape; the student starts them afresh", tdir, ", ".join(left))
    return copied


def with_teacher_labels(data: PreparedData, labels: TeacherLabels) -> PreparedData:
    """The data with the kept unlabelled images appended to the labelled training images
    (with the teacher's labels); the rest stay unlabelled."""
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


class SelfTraining(Algorithm):
    """Self-training on the engine: before the student's first epoch, a teacher labels
    the unlabelled images and the surest join the labelled ones (see the module
    docstring); the student then trains as the supervised method does.

    Its options: ``teacher`` or ``teacher_epochs``, ``teacher_fraction``,
    ``student_init``, and the labeller's ``pseudo_labeller`` and ``pseudo_threshold``.
    Its state: the teacher's labels, saved in the run folder (``teacher_labels.pt``) and
    read back when the run resumes; the teacher stage's own run folder (``teacher/``).
    """

    name = "self-training"

    def __init__(self, cfg: RunConfig) -> None:
        self.stats: dict[str, Any] = {}  # the labelling's figures, for the log and the summary
        self.shared: SharedFeatures | None = None  # the teacher's frozen-stage features, until the student takes them
        self.student_init = cfg.student_init

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        semi = METHODS[cfg.method].uses_unlabelled
        if cfg.teacher is not None and semi:
            raise ConfigError(
                f"--teacher labels the unlabelled images once, before training, and method {cfg.method} labels them "
                "itself as it trains: use one of the two (with --teacher, a supervised method such as mixup or mbdml1)"
            )
        if cfg.teacher_epochs is not None:
            if cfg.teacher is not None:
                raise ConfigError("--teacher names a finished teacher and --teacher_epochs trains one in this run: drop one of the two")
            if semi:
                raise ConfigError(
                    f"--teacher_epochs trains a teacher that labels the unlabelled images once, and method {cfg.method} labels "
                    "them itself as it trains: use a supervised method such as mbdml1 or mixup, or drop --teacher_epochs"
                )
        if cfg.student_init == "teacher" and cfg.teacher is None and cfg.teacher_epochs is None:
            raise ConfigError(
                "--student_init teacher starts a self-training student from its teacher's weights, and this run has no "
                "teacher: add --teacher FOLDER or --teacher_epochs N, or drop --student_init"
            )

    @classmethod
    def applies_to(cls, cfg: RunConfig) -> bool:
        return cfg.teacher is not None or cfg.teacher_epochs is not None

    def prepare(self, trainer: Trainer, data: PreparedData) -> PreparedData:
        """Label with the teacher (``--teacher``, or the teacher stage of
        ``--teacher_epochs``, trained here first) and return the student's data. The
        labels are saved in the run folder (by the main process); a resumed run reads them
        back instead of labelling again. With ``--teacher_epochs`` the run folder holds the
        teacher stage too: an interrupted run resumes in it, before the student has a
        checkpoint of its own, so the configuration is saved first."""
        cfg, run_dir, dist = trainer.cfg, trainer.run_dir, trainer.dist
        if cfg.teacher_epochs is not None and not trainer.resume and dist.is_main:
            trainer.folder.save_config(cfg)
        path = run_dir / LABELS_FILE
        teacher = None
        if trainer.resume and path.is_file():
            labels = TeacherLabels.load(path)
        else:
            teacher = train_teacher(cfg, data, run_dir) if cfg.teacher_epochs is not None else load_teacher(cfg, data, trainer.device)
            labels = label_unlabelled(teacher, cfg, data, trainer.device, dist=dist)
            if dist.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                labels.save(path)
        student_data = with_teacher_labels(data, labels)
        self.shared = None if teacher is None else student_features(teacher, data, student_data, labels)
        del teacher
        self.stats = labels.stats(data.unlabelled.labels)
        teacher_summary = run_dir / TEACHER_DIR / "summary.json"  # written by the teacher stage of --teacher_epochs
        if cfg.teacher_epochs is not None and teacher_summary.is_file():
            summary = json.loads(teacher_summary.read_text())
            final, epochs = summary.get("final", {}), summary.get("epochs") or 0
            self.stats.update(teacher_epochs=epochs, teacher_train_s=(summary.get("train_seconds_per_epoch") or 0.0) * epochs,
                              teacher_val_acc=final.get("val_acc"), teacher_test_acc=final.get("nngk_acc"))
        log.info(
            "teacher %s labelled %d of %d unlabelled images (%.1f%%), %s, in %.1fs",
            labels.teacher, self.stats["teacher_n"], labels.unlabelled_count, 100 * self.stats["teacher_fraction_kept"],
            "none of known class to check" if self.stats["teacher_label_acc"] is None else f"{100 * self.stats['teacher_label_acc']:.2f}% right",
            labels.seconds,
        )
        return student_data

    def after_build(self, trainer: Trainer) -> None:
        """``--student_init teacher``: the student starts from the teacher's network (not
        when it resumes from its own checkpoint); the student's frozen-stage cache takes
        the teacher's features over."""
        if self.student_init == "teacher" and not trainer.restoring:
            copied = start_from_teacher(trainer.model, trainer.method, trainer.cfg, trainer.run_dir)
            log.info("the student starts from its teacher's network%s", f" and {', '.join(copied)}" if copied else "")
        if self.shared is not None:
            kept = self.shared.give_to(trainer.frozen_cache, trainer.cfg)
            log.info("the student takes over the teacher's frozen-stage features of %d image sets", kept)
            self.shared = None

    def summary(self) -> dict[str, Any]:
        return {"self_training": self.stats} if self.stats else {}
