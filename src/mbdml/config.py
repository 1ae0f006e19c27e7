"""One dataclass for a run, its presets, and their checks.

A run's resolved configuration is saved beside its results (``config.json``) and is
enough, with the package versions saved next to it, to rerun it exactly. Nothing in a
configuration file is evaluated as code: it is plain JSON, checked field by field.

Presets:

- ``default``: ours, for training from scratch on a CPU (a small CIFAR-style ResNet, a
  128-d embedding, padded-crop + flip, Adam). Chosen on validation data only.
- ``scratch``: the longer from-scratch recipe of docs/accuracy.md, chosen on validation
  data: SGD with Nesterov momentum on a one-cycle schedule (0.05), label smoothing 0.1,
  batch 128, test-time flip, a refresh every 4 epochs, 70 epochs (about 30 minutes of
  CIFAR-10 at 10% labels on two CPU cores with ``--amp bf16``).
- ``finetune``: the same optimiser and schedule for the ImageNet-pretrained
  EfficientNet-Lite0 (the weights of the ``efficientnet`` extra), images resized to
  128 pixels, the stem and first 3 stages kept fixed (``freeze_stages``), a rate of
  0.02, a refresh every 6 epochs, 30 epochs, and one pass per image for the methods
  with a clean and a mixed term (``split_batch``): about 29 minutes of MbDML1 on
  CIFAR-10 at 10% labels on two CPU cores with ``--amp bf16``, 51-59 in float32 on an
  AVX2 CPU (docs/accuracy.md). Until 2026-12-02 it used 96 pixels, a refresh every 4
  epochs and two passes.
- ``paper``: the authors' set-up (SPEC §5) and their README's command: ResNet-50 (2048-d
  post-ReLU features as the embedding), BatchNorm frozen, flip only, Adam at 1e-5, batch
  32, 200 epochs, their classifier's floor (``class_floor="authors"``), their scripts'
  per-method loss weights and the raw features as mixup logits (docs/paper-preset.md
  gives each value's source). The ImageNet weights
  are not bundled: pass ``--pretrained PATH`` to a torchvision ResNet-50 checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRESETS = ("default", "scratch", "finetune", "paper")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
PSEUDO_AUGMENTS = ("standard", "randaugment")  # how the semi-supervised methods augment pseudo-labelled images
STUDENT_INITS = ("pretrained", "teacher")  # where a self-training student's weights start
AMP_CHOICES = ("none", "bf16", "auto")  # resolved per device by mbdml.precision.resolve_amp


@dataclass
class RunConfig:
    """Everything that decides a training run."""

    # what to train
    method: str = "mbdml2"
    preset: str = "default"
    # data
    dataset: str = "digits"  # digits | fashion-mnist | cifar10 | a path (see mbdml.data.sources.load_dataset)
    test_dir: str | None = None  # the authors' --test: a folder of class folders
    im_ext: str = "jpg"
    num_classes: int | None = None  # checked against the data when given
    input_size: int | None = None  # resize every image to this square size once, at load
    on_bad_image: str = "error"  # error | skip
    # image files of more pixels are refused before decoding (decompression bombs); None: no cap
    max_image_pixels: int | None = 100_000_000  # mbdml.data.sources.DEFAULT_MAX_IMAGE_PIXELS
    cache_dir: str = ".cache/mbdml"
    labelled_fraction: float = 0.1
    split: str = "random"  # random | folds
    run: int = 0  # fold index with split=folds
    val_fraction: float = 0.1  # of the labelled images, kept out of training for model selection
    # model
    model: str = "resnet_small"
    width: int = 32
    embedding_dim: int | None = 128  # None: the backbone's raw features (the paper: 2048)
    normalize_embeddings: bool = True  # ours: unit-length embeddings, so sigma is a fixed temperature
    pretrained: str | None = None
    freeze_bn: bool = False
    freeze_stages: int = 0  # keep the stem and this many early stages of a pretrained trunk fixed
    frozen_cache_gb: float = 4.0  # memory for the frozen stages' outputs of un-augmented images (0: recompute them)
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics before each centre refresh
    # re-estimate them on at most this many training images, a fixed random subset drawn from the
    # seed (None: all of them); with self-training's tens of thousands of images a subset costs less
    recalibrate_bn_images: int | None = None
    channels_last: bool = True
    amp: str = "none"  # none | bf16 | auto: bfloat16 autocast for the network (about 2x faster on CPUs with AVX512-BF16 or AMX, much slower without); auto: bf16 where native
    compile: bool = False  # torch.compile the training forward pass
    # kernel classifier
    sigma: float = 0.3  # ours, for unit-length embeddings; the paper's 10 suits raw 2048-d features
    k: int = 200
    # a class with no neighbour in the list: "authors" floors its unnormalised mass at 1e-10
    # before normalising (their classifier.py), "normalised" floors its probability after
    class_floor: str = "normalised"
    update_interval: int = 2
    learn_kernel_weights: bool = True
    search: str = "torch"
    # mixup and loss weights
    alpha: float = 1.0
    scale_mixup: float | None = None  # None: the preset's value for the method
    beta: float = 1.0
    mixup_head: str = "linear"
    mixed_neighbours: str = "sample"
    label_smoothing: float = 0.0  # for the NNGK and cross-entropy terms
    # mbdml1/mbdml3 and the semi methods: clean term on half the batch, mixed on the other half
    # (one pass); None: the preset's value for the method (default_split_batch)
    split_batch: bool | None = None
    # semi-supervised (methods mbdml_semi, mbdml1_semi): pseudo-labels from the kernel classifier
    pseudo_threshold: float = 0.9  # keep an unlabelled image when its top class probability reaches this
    pseudo_start: int | None = None  # first epoch (0-based) with pseudo-labels; None: a quarter of max_epochs
    pseudo_weight: float = 1.0  # weight of the pseudo-labelled images' NNGK loss
    # keep by rank instead of by threshold: per predicted class, the most confident images,
    # a share of the unlabelled set growing linearly to this fraction at the last epoch
    pseudo_fraction: float | None = None
    # pseudo-labelled images drawn per labelled image at each step (each is used clean or mixed with a labelled image)
    pseudo_ratio: int = 1
    # what gives the pseudo-labels and their confidence: the kernel classifier on the K nearest
    # centres, the kernel classifier on every centre, the mixup head's softmax (methods with a
    # head: mbdml1_semi), or the mean of the kernel's and the head's probabilities
    pseudo_labeller: str = "kernel"
    # how the pseudo-labelled images are augmented when they are trained on: like the labelled
    # ones (standard), or also with RandAugment and a Cutout of half the side (randaugment: the
    # strong view of FixMatch; mbdml.data.randaugment)
    pseudo_augment: str = "standard"
    # label the unlabelled images drawn at each step with the current model (its eval-mode
    # embedding of the un-augmented image, FixMatch's weak view), keeping those whose
    # confidence reaches pseudo_threshold, instead of labelling every unlabelled image at the refreshes
    pseudo_online: bool = False
    randaugment_ops: int = 2  # operations per image
    randaugment_magnitude: float = 1.0  # each operation's magnitude is drawn in [0, this]; 1: the full range
    # self-training: a finished run on the same split labels the unlabelled images once,
    # before training; its surest pseudo-labels join the labelled images (mbdml.self_training)
    teacher: str | None = None
    teacher_fraction: float | None = 0.8  # kept by rank, balanced per class; None: by pseudo_threshold
    # self-training in one run: the method first trains this many epochs on the labelled images
    # alone (the teacher, in the run folder's teacher/), labels, then the student trains for max_epochs
    teacher_epochs: int | None = None
    # the student's starting weights: the pretrained (or random) ones, like the teacher's, or the
    # teacher's final network and mixup head (the kernel's per-centre weights start afresh)
    student_init: str = "pretrained"  # pretrained | teacher
    centre_momentum: float | None = None  # None: centres change only at a refresh (SPEC); m in [0, 1): a memory bank
    # optimisation
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    batch_size: int = 64
    max_epochs: int = 30
    flip: bool | None = None  # None: on for colour images, off for grey ones (digits and letters are not mirror-symmetric)
    crop_padding: int | None = None  # None: an eighth of the image side (4 px at 32 px, 1 px at 8 px)
    cutout: int = 0  # side in pixels of a square set to the mean colour in each training image (0: off)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    # evaluation
    eval_every: int | None = None  # None: right after each centre refresh
    knn_k: int = 10
    retrieval_metrics: bool = True
    tsne_graph: bool = False
    tta_flip: bool = False  # centres and test embeddings: mean of the image's and its mirror image's embeddings
    # run
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    keep_freed_memory: bool = True  # glibc malloc keeps freed blocks for reuse: 4x fewer page faults, same results (mbdml.cpu_memory)
    sync_bn: bool = False  # several CUDA processes: BatchNorm statistics over the global batch
    dist_timeout: float = 600.0  # seconds a process waits for the others before giving up
    save_dir: str = "runs"
    name: str | None = None
    progress: bool = True

    # ------------------------------------------------------------------ checks
    def validate(self) -> "RunConfig":
        """Refuse values that make no sense, before any work starts."""

        def positive(name: str, value: float, fix: str) -> None:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}; {fix}")

        from .kernel import CLASS_FLOORS
        from .methods import METHODS, MIXED_NEIGHBOURS, MIXUP_HEADS, PSEUDO_LABELLERS
        from .models import MODEL_NAMES
        from .models.embedding import means_no_pretrained
        from .neighbours import SEARCH_BACKENDS

        def choice(name: str, value: str, options: tuple[str, ...] | list[str]) -> None:
            if value not in options:
                raise ConfigError(f"--{name} {value!r} is not known; choose one of: {', '.join(options)}")

        choice("method", self.method, list(METHODS))
        choice("preset", self.preset, PRESETS)
        choice("model", self.model, MODEL_NAMES)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("schedule", self.schedule, SCHEDULES)
        if not (self.device in DEVICES or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"--device {self.device!r} is not known; choose one of: {', '.join(DEVICES)} (or cuda:N)")
        choice("search", self.search, SEARCH_BACKENDS)
        choice("class_floor", self.class_floor, CLASS_FLOORS)
        choice("mixup_head", self.mixup_head, MIXUP_HEADS)
        choice("mixed_neighbours", self.mixed_neighbours, MIXED_NEIGHBOURS)
        choice("pseudo_labeller", self.pseudo_labeller, PSEUDO_LABELLERS)
        choice("pseudo_augment", self.pseudo_augment, PSEUDO_AUGMENTS)
        choice("student_init", self.student_init, STUDENT_INITS)
        choice("split", self.split, ("random", "folds"))
        choice("amp", self.amp, AMP_CHOICES)
        choice("on_bad_image", self.on_bad_image, ("error", "skip"))
        positive("sigma", self.sigma, "pass --sigma 10 (the paper's value)")
        positive("learning_rate", self.learning_rate, "pass e.g. --learning_rate 1e-3")
        positive("dist_timeout", self.dist_timeout, "pass e.g. --dist_timeout 600 (seconds)")
        if not 0 < self.pseudo_threshold <= 1:
            raise ConfigError(f"pseudo_threshold must be in (0, 1], got {self.pseudo_threshold}; pass --pseudo_threshold 0.9, say")
        _check_share("pseudo_fraction", self.pseudo_fraction, "leave it out to select by --pseudo_threshold")
        _check_share("teacher_fraction", self.teacher_fraction, "none to keep by --pseudo_threshold")
        if self.pseudo_online and self.pseudo_fraction is not None:
            raise ConfigError(
                "--pseudo_online labels the images drawn at each step and keeps those whose confidence reaches "
                "--pseudo_threshold; --pseudo_fraction ranks the whole unlabelled set at a refresh: drop one of the two"
            )
        if self.pseudo_start is not None and self.pseudo_start < 0:
            raise ConfigError(f"pseudo_start must be an epoch >= 0, got {self.pseudo_start}")
        if self.alpha < 0 or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be >= 0 (0 turns mixing off), got {self.alpha}; pass --alpha 1")
        for name in ("scale_mixup", "beta", "weight_decay", "momentum"):
            v = getattr(self, name)
            if v is not None and (v < 0 or not math.isfinite(v)):
                raise ConfigError(f"{name} must be >= 0, got {v}")
        for name in ("k", "batch_size", "max_epochs", "update_interval", "knn_k", "width", "pseudo_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
        if self.recalibrate_bn_images is not None and (
                isinstance(self.recalibrate_bn_images, bool) or not isinstance(self.recalibrate_bn_images, int) or self.recalibrate_bn_images < 1):
            raise ConfigError(
                f"recalibrate_bn_images must be a whole number >= 1 (or none for every training image), got {self.recalibrate_bn_images!r}"
            )
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")
        if not 0 < self.labelled_fraction <= 1:
            raise ConfigError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}; e.g. 0.1 for 10% of the training images")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be >= 1 (or none for the raw features), got {self.embedding_dim}")
        splitting = [name for name, cls in METHODS.items() if cls.can_split_batch]
        if self.split_batch and self.method not in splitting:
            raise ConfigError(
                f"split_batch shares each batch between a clean and a mixed term, which only {', '.join(splitting)} "
                f"have; method {self.method} does not split that way: drop --split_batch"
            )
        method_cls = METHODS[self.method]
        if self.teacher is not None and method_cls.uses_unlabelled:
            raise ConfigError(
                f"--teacher labels the unlabelled images once, before training, and method {self.method} labels them "
                "itself as it trains: use one of the two (with --teacher, a supervised method such as mixup or mbdml1)"
            )
        if self.teacher_epochs is not None:
            if isinstance(self.teacher_epochs, bool) or not isinstance(self.teacher_epochs, int) or self.teacher_epochs < 1:
                raise ConfigError(
                    f"teacher_epochs must be a whole number >= 1 (the teacher stage's epochs), got {self.teacher_epochs!r}; "
                    "pass none (or leave it out) for no teacher stage"
                )
            if self.teacher is not None:
                raise ConfigError(
                    "--teacher names a finished teacher and --teacher_epochs trains one in this run: drop one of the two"
                )
            if method_cls.uses_unlabelled:
                raise ConfigError(
                    f"--teacher_epochs trains a teacher that labels the unlabelled images once, and method {self.method} labels "
                    "them itself as it trains: use a supervised method such as mbdml1 or mixup, or drop --teacher_epochs"
                )
        if self.student_init == "teacher" and self.teacher is None and self.teacher_epochs is None:
            raise ConfigError(
                "--student_init teacher starts a self-training student from its teacher's weights, and this run has no "
                "teacher: add --teacher FOLDER or --teacher_epochs N, or drop --student_init"
            )
        if self.pseudo_augment != "standard" and not method_cls.uses_unlabelled:
            semi = [name for name, cls in METHODS.items() if cls.uses_unlabelled]
            raise ConfigError(
                f"--pseudo_augment {self.pseudo_augment} augments the pseudo-labelled images, and method {self.method} has "
                f"none; use a semi-supervised method ({', '.join(semi)}) or drop --pseudo_augment"
            )
        from .data.randaugment import RandAugment

        RandAugment(num_ops=self.randaugment_ops, magnitude=self.randaugment_magnitude)  # its own checks
        if self.pseudo_online and not method_cls.uses_unlabelled:
            semi = [name for name, cls in METHODS.items() if cls.uses_unlabelled]
            raise ConfigError(
                f"--pseudo_online labels unlabelled images as they are drawn, and method {self.method} trains on none; "
                f"use a semi-supervised method ({', '.join(semi)}) or drop --pseudo_online"
            )
        if self.pseudo_labeller in ("head", "mean") and method_cls.uses_unlabelled and not method_cls.has_head:
            with_head = [name for name, cls in METHODS.items() if cls.uses_unlabelled and cls.has_head]
            raise ConfigError(
                f"pseudo_labeller {self.pseudo_labeller} reads the mixup head's softmax, and method {self.method} has no head; "
                f"use --pseudo_labeller kernel, or a method with one: {', '.join(with_head)}"
            )
        if isinstance(self.frozen_cache_gb, bool) or not isinstance(self.frozen_cache_gb, (int, float)) or not self.frozen_cache_gb >= 0:
            raise ConfigError(f"frozen_cache_gb must be a number of GiB >= 0 (0 turns the cache off), got {self.frozen_cache_gb!r}")
        if isinstance(self.freeze_stages, bool) or not isinstance(self.freeze_stages, int) or self.freeze_stages < 0:
            raise ConfigError(f"freeze_stages must be a whole number >= 0 (0 freezes nothing), got {self.freeze_stages!r}")
        if self.freeze_stages > 0 and means_no_pretrained(self.pretrained):
            raise ConfigError(
                f"freeze_stages {self.freeze_stages} would fix randomly initialised layers: it is for a pretrained "
                "trunk; pass --pretrained (e.g. --model efficientnet_lite0 --pretrained imagenet) or --freeze_stages 0"
            )
        from .data.sources import check_max_image_pixels

        check_max_image_pixels(self.max_image_pixels)
        if self.input_size is not None and self.input_size < 8:
            raise ConfigError(f"input_size must be at least 8 pixels, got {self.input_size}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if isinstance(self.cutout, bool) or not isinstance(self.cutout, int) or self.cutout < 0:
            raise ConfigError(f"--cutout must be a whole number of pixels >= 0, got {self.cutout!r}; pass 0 to turn it off")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.run < 0 or self.seed < 0:
            raise ConfigError(f"run and seed must be >= 0, got run={self.run}, seed={self.seed}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"mean and std must have the same length and std > 0, got mean={self.mean}, std={self.std}")
        return self

    def with_data(self, channels: int, image_side: int) -> "RunConfig":
        """Fill the values that depend on the images (augmentation left on 'auto')."""
        cfg = dataclasses.replace(self)
        if cfg.flip is None:
            cfg.flip = channels >= 3
        if cfg.crop_padding is None:
            cfg.crop_padding = max(1, image_side // 8)
        return cfg

    def with_absolute_paths(self) -> "RunConfig":
        """A copy whose paths (a data folder, --test, --teacher, a --pretrained file, --cache_dir)
        are absolute: a saved run then reads the same files from any working folder, and one
        folder named once relative and once absolute is one folder."""
        from .data.sources import is_dataset_name
        from .models.embedding import means_no_pretrained

        def absolute(path: str) -> str:
            return os.path.abspath(os.path.expanduser(path))

        cfg = dataclasses.replace(self)
        if not is_dataset_name(cfg.dataset):
            cfg.dataset = absolute(cfg.dataset)
        if cfg.test_dir is not None:
            cfg.test_dir = absolute(cfg.test_dir)
        if cfg.teacher is not None:
            cfg.teacher = absolute(cfg.teacher)
        if isinstance(cfg.pretrained, str) and not means_no_pretrained(cfg.pretrained) and cfg.pretrained.strip().lower() not in ("true", "imagenet"):
            cfg.pretrained = absolute(cfg.pretrained)
        cfg.cache_dir = absolute(cfg.cache_dir)
        return cfg

    def resolved(self) -> "RunConfig":
        """Fill the values that depend on others (per-method weights, eval cadence), and make
        the paths absolute (:meth:`with_absolute_paths`)."""
        cfg = self.with_absolute_paths()
        if cfg.scale_mixup is None:
            cfg.scale_mixup = default_scale_mixup(cfg.preset, cfg.method)
        if cfg.split_batch is None:
            cfg.split_batch = default_split_batch(cfg.preset, cfg.method)
        if cfg.eval_every is None:
            cfg.eval_every = cfg.update_interval
        if cfg.pseudo_start is None:
            cfg.pseudo_start = cfg.max_epochs // 4
        if cfg.name is None:
            cfg.name = f"{cfg.method}-{Path(cfg.dataset).name or cfg.dataset}-seed{cfg.seed}-run{cfg.run}"
        return cfg.validate()

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Build from plain JSON values, refusing unknown keys and wrong types."""
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}; known keys are the fields of mbdml.config.RunConfig")
        # A key written before it existed means what the code did then.
        data = {**_BEFORE_THE_FIELD, **data}
        values: dict[str, Any] = {}
        for key, value in data.items():
            values[key] = _coerce(key, value, known[key].type)
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the configuration as JSON, atomically (a crash leaves the old file or the new one)."""
        from .checkpoint import atomic_write

        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write(Path(path), lambda f: f.write(text.encode()))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no configuration file at {path}; is this a run folder written by 'mbdml train'?") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid JSON ({exc}); restore it or start a new run") from None
        return cls.from_dict(data)


# Fields added after runs were saved, with the value those runs used (an older config.json
# lacks the key): the floor was applied after normalising until class_floor existed.
_BEFORE_THE_FIELD: dict[str, Any] = {"class_floor": "normalised"}


def _check_share(name: str, value: Any, otherwise: str) -> None:
    """A share of the unlabelled images kept by rank: None (select otherwise) or in (0, 1]."""
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}; pass --{name} 0.8, say, or {otherwise}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Check one JSON value against the field's declared type (a string annotation)."""
    t = str(type_name)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"configuration key {key!r} cannot be null")
    if t.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"configuration key {key!r} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"configuration key {key!r} must be true or false, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"configuration key {key!r} must be a whole number, got {value!r}")
        return value
    if t.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"configuration key {key!r} must be a number, got {value!r}")
        return float(value)
    if t.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"configuration key {key!r} must be a string, got {value!r}")
        return value
    return value


# The authors' per-method mixup weights (SPEC §4); ours are 1 everywhere.
_PAPER_SCALE_MIXUP = {"mixup": 1e-4, "mbdml1": 1e-4, "mbdml2": 1e-4, "mbdml3": 2.0}


def default_scale_mixup(preset: str, method: str) -> float:
    """The mixup weight s a preset gives a method."""
    if preset == "paper":
        return _PAPER_SCALE_MIXUP.get(method, 1.0)
    return 1.0


def default_split_batch(preset: str, method: str) -> bool:
    """Whether a preset gives a method one pass per image (``split_batch``).

    The ``finetune`` preset does, for the methods that have a clean and a mixed term:
    its figures were measured so (docs/accuracy.md, runs V-AX). Elsewhere the paper's
    two passes.
    """
    from .methods import METHODS

    method_cls = METHODS.get(method)  # an unknown method is refused by validate()
    return preset == "finetune" and method_cls is not None and method_cls.can_split_batch


def preset_values(preset: str) -> dict[str, Any]:
    """The field values a preset sets (the rest keep the dataclass defaults)."""
    if preset == "default":
        return {}
    if preset == "scratch":
        return {
            "optimizer": "sgd",
            "learning_rate": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "onecycle",
            "label_smoothing": 0.1,
            "batch_size": 128,
            "tta_flip": True,
            "update_interval": 4,
            "max_epochs": 70,
            "amp": "auto",  # bfloat16 where the CPU/GPU computes it natively (the recipe was measured so)
        }
    if preset == "finetune":
        return {
            **preset_values("scratch"),
            "model": "efficientnet_lite0",
            "pretrained": "imagenet",
            "input_size": 128,
            "freeze_stages": 3,
            "mean": (0.5,),
            "std": (0.5,),
            "learning_rate": 0.02,
            "update_interval": 6,  # 5 refreshes in 30 epochs
            "max_epochs": 30,
        }
    if preset == "paper":
        return {
            "preset": "paper",
            "model": "resnet50",
            "embedding_dim": None,
            "normalize_embeddings": False,
            "freeze_bn": True,
            "recalibrate_bn": False,
            "channels_last": False,
            "sigma": 10.0,
            "k": 200,
            "update_interval": 5,
            "optimizer": "adam",
            "learning_rate": 1e-5,
            "weight_decay": 0.0,
            "schedule": "none",
            "batch_size": 32,
            "max_epochs": 200,  # their README's commands (--max_epochs=200); the scripts' default is 50
            "class_floor": "authors",
            "flip": True,
            "crop_padding": 0,
            "mean": (0.5,),
            "std": (0.5,),
            "mixup_head": "features",
            "mixed_neighbours": "sample",
            "alpha": 1.0,
            "beta": 1.0,
            "val_fraction": 0.1,
        }
    raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")


def make_config(preset: str = "default", **overrides: Any) -> RunConfig:
    """A configuration from a preset, with explicit values on top."""
    values = preset_values(preset)
    values.update(overrides)
    values["preset"] = preset
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    return RunConfig(**values)
