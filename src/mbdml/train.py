"""The training loop: epochs, centre refresh, evaluation, checkpoints, logs.

A run writes everything to its own folder::

    config.json        the resolved configuration (rerun it with --config)
    environment.json   package versions, device, command line
    metrics.csv        one row per epoch: loss, train/val/test accuracy, lr, time
    summary.json       final model, best-on-validation model, the authors' best-on-test
    last.pt, best.pt   full state (resume) and the best-on-validation model
    accuracy.png       accuracy and loss curves
    train.log          the log

Every epoch ends with an atomic checkpoint of the whole state (model, kernel weights
and centres, optimiser, random generators, metrics so far), so a run killed at any
moment loses at most the epoch it was in: ``mbdml train --resume RUN_DIR``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import __version__
from . import distributed as dist_utils
from .checkpoint import (
    check_model_state,
    check_resume_state,
    claim_new_run_dir,
    claim_run_dir,
    load_checkpoint,
    next_run_dir,
    save_checkpoint,
    save_json,
)
from .config import RunConfig
from .cpu_memory import keep_freed_memory
from .errors import CheckpointError, ConfigError, DataError, MbdmlError, TrainingError
from .evaluate import compute_embeddings, evaluate_embeddings
from .feature_cache import FrozenFeatureCache
from .kernel import NNGKClassifier
from .methods import PSEUDO_LABELLERS, Method, MethodOptions, build_method
from .models import EmbeddingNet, build_model, recalibrate_batchnorm, set_batchnorm_eval
from .precision import cpu_description, cpu_model_name, resolve_amp

if TYPE_CHECKING:
    from .data.batches import Augmentation
    from .data.randaugment import RandAugment

log = logging.getLogger("mbdml")

METRIC_KEYS = ("nngk_acc", "knn_acc", "precision_at_1", "map_at_r", "nmi")


# ---------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; asking for a missing one is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--gpu_id {dev.index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but Apple MPS is not available here; use --device cpu")
    return dev


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch's global generator (model initialisation) and set determinism."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def environment_info() -> dict[str, Any]:
    """Versions of what a run depends on, saved beside its configuration."""
    import numpy

    info: dict[str, Any] = {
        "mbdml": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model_name(),
        "cpu_capability": cpu_description(),
        "commit": source_commit(),
    }
    for mod in ("pytorch_metric_learning", "sklearn", "PIL", "faiss"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def source_commit() -> str | None:
    """The git commit of the mbdml source tree that runs (with ``-dirty`` when it has
    uncommitted changes), or None outside a git checkout (an installed wheel)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def learning_rate_at(cfg: RunConfig, step: int, total_steps: int) -> float:
    """The schedule, as a pure function of the step (so resuming needs no scheduler state)."""
    base = cfg.learning_rate
    t = min(1.0, step / max(1, total_steps))
    if cfg.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        warm = 0.25
        if t < warm:
            return base * (0.1 + 0.9 * t / warm)
        return base * max(0.0, (1.0 - t) / (1.0 - warm))
    return base


def training_augmentation(cfg: RunConfig) -> "Augmentation":
    """The batch augmentation of a run: flips, padded crops and cutout filled with the
    normalisation mean (so the square is 0 once normalised)."""
    from .data.batches import Augmentation

    fill = tuple(255.0 * m for m in cfg.mean)
    return Augmentation(flip=bool(cfg.flip), crop_padding=int(cfg.crop_padding or 0), cutout=cfg.cutout, cutout_fill=fill)


def strong_augmentation(cfg: RunConfig) -> "RandAugment":
    """The RandAugment of ``--pseudo_augment randaugment``, filled with the normalisation
    mean (so a Cutout square, and what a rotation or shift brings in, is 0 once normalised)."""
    from .data.randaugment import RandAugment

    fill = tuple(255.0 * m for m in cfg.mean)
    return RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude, fill=fill)


def pseudo_share(cfg: RunConfig, epoch: int) -> float:
    """The share of the unlabelled images kept at a labelling in ``epoch`` (0-based):
    from ``update_interval`` epochs' worth at ``pseudo_start`` up to ``pseudo_fraction``
    at the last epoch, linearly (a curriculum: the surest images first)."""
    start = int(cfg.pseudo_start or 0)
    span = max(1, cfg.max_epochs - start)
    return float(cfg.pseudo_fraction) * min(1.0, (epoch - start + cfg.update_interval) / span)


def select_by_rank(confidence: torch.Tensor, labels: torch.Tensor, num_classes: int, share: float) -> torch.Tensor:
    """Mask of the images to keep: for each predicted class, its most confident images,
    up to ``share`` x (number of images) / (number of classes) of them.

    Balanced per class, so a class the classifier is unsure of still gets its share of
    pseudo-labels (a threshold on the kernel classifier's probabilities, which are
    smooth over K = 200 neighbours, keeps few images and those of the easy classes).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    per_class = int(round(share * labels.numel() / num_classes))
    if per_class <= 0:
        return keep
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if members.numel():
            top = confidence[members].topk(min(per_class, members.numel())).indices
            keep[members[top]] = True
    return keep


def labeller_probabilities(
    labeller: str,
    kernel: NNGKClassifier,
    embeddings: torch.Tensor,
    neighbours: torch.Tensor,
    head: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Class probabilities (B, C) by which ``labeller`` (see ``--pseudo_labeller``) labels
    and ranks unlabelled images: the kernel classifier on the ``neighbours`` (K nearest
    centres), on every centre (``kernel_all``), the ``head``'s softmax, or the mean.

    The kernel classifier's probabilities saturate when all K nearest centres are of
    one class: the fine-tuned Lite0 of docs/accuracy.md gives 83% of the unlabelled
    images a top probability of exactly 1.0 (K = 200), so a ranking by it cannot tell
    a sure image from a doubtful one. On every centre, and through the head, they keep
    that order (``benchmarks/pseudo_labellers.py`` measures them).
    """
    if labeller not in PSEUDO_LABELLERS:
        raise ConfigError(f"pseudo_labeller {labeller!r} is not known; choose one of: {', '.join(PSEUDO_LABELLERS)}")
    if labeller == "kernel_all":
        return kernel.log_probs_every_centre(embeddings).exp()
    if labeller == "kernel":
        return kernel.log_probs(embeddings, neighbours).exp()
    if head is None:
        raise ConfigError(f"pseudo_labeller {labeller} reads the mixup head's softmax, and this method has no head")
    soft = torch.softmax(head(embeddings).float(), dim=1)
    return soft if labeller == "head" else 0.5 * (kernel.log_probs(embeddings, neighbours).exp() + soft)


def recalibration_rows(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """The training images whose BatchNorm statistics are re-estimated: all (None) when
    ``limit`` is None or not below ``n``, else a fixed random subset of ``limit`` rows,
    ascending, drawn from ``seed`` (the same at every refresh and after a resume)."""
    if limit is None or limit >= n:
        return None
    gen = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n, generator=gen)[:limit].sort().values


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def unique_run_dir(save_dir: str | Path, name: str) -> Path:
    """save_dir/name, or name-2, name-3... when that folder already holds a run (a folder
    left by a start that failed before training is used again)."""
    return next_run_dir(save_dir, name)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows, with the union of their keys as columns (written atomically)."""
    from .checkpoint import _atomic_write

    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


# ------------------------------------------------------------------- the data
@dataclass
class PreparedData:
    """The labelled training images (centres), validation and test images."""

    train: Any  # ImageSet of labelled training images, in centre order
    val: Any  # ImageSet (possibly empty)
    test: Any  # ImageSet
    classes: list[str]
    unlabelled_count: int
    # The training images whose labels are hidden. Only a semi-supervised method trains on
    # them (with pseudo-labels); their true labels are used for nothing but a logged
    # diagnostic: how many of the pseudo-labels are right.
    unlabelled: Any = None


def prepare_data(cfg: RunConfig) -> PreparedData:
    """Load the data set, draw the labelled split and the validation part (seeded)."""
    from .data.sources import load_dataset
    from .data.split import check_every_class_labelled, labelled_split, validation_split

    train_all, test = load_dataset(
        cfg.dataset,
        test_dir=cfg.test_dir,
        im_ext=cfg.im_ext,
        image_size=cfg.input_size,
        on_bad_image=cfg.on_bad_image,
        cache_dir=cfg.cache_dir,
        max_image_pixels=cfg.max_image_pixels,
    )
    if cfg.num_classes is not None and cfg.num_classes != train_all.num_classes:
        raise DataError(
            f"--num_classes {cfg.num_classes} disagrees with the data: {cfg.dataset} has {train_all.num_classes} classes "
            f"({', '.join(train_all.classes[:10])}{'...' if train_all.num_classes > 10 else ''}); drop --num_classes or fix the folders"
        )
    labelled = labelled_split(train_all.labels, cfg.labelled_fraction, cfg.seed, cfg.split, cfg.run)
    train_idx, val_idx = validation_split(train_all.labels, labelled, cfg.val_fraction, cfg.seed)
    check_every_class_labelled(train_all.labels, train_idx, train_all.num_classes, train_all.classes)
    return PreparedData(
        train=train_all.subset(train_idx),
        val=train_all.subset(val_idx),
        test=test,
        classes=list(train_all.classes),
        unlabelled_count=len(train_all) - len(labelled),
        unlabelled=train_all.subset(_complement(len(train_all), labelled)),
    )


def _complement(n: int, chosen: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.as_tensor(chosen, dtype=torch.long)] = False
    return keep.nonzero().reshape(-1)


def build_components(cfg: RunConfig, in_channels: int, num_classes: int, pretrained: str | bool | None = None) -> tuple[EmbeddingNet, NNGKClassifier, Method]:
    """The embedding model, the kernel classifier and the method a configuration asks for."""
    model = build_model(cfg.model, in_channels=in_channels, embedding_dim=cfg.embedding_dim, pretrained=pretrained, width=cfg.width, normalize=cfg.normalize_embeddings, freeze_stages=cfg.freeze_stages)
    kernel = NNGKClassifier(
        num_classes=num_classes, sigma=cfg.sigma, k=cfg.k, class_floor=cfg.class_floor, learn_weights=cfg.learn_kernel_weights, search_backend=cfg.search
    )
    options = MethodOptions(
        scale_mixup=float(cfg.scale_mixup if cfg.scale_mixup is not None else 1.0),
        beta=cfg.beta,
        alpha=cfg.alpha,
        mixup_head=cfg.mixup_head,
        mixed_neighbours=cfg.mixed_neighbours,
        centre_momentum=cfg.centre_momentum,
        label_smoothing=cfg.label_smoothing,
        pseudo_weight=cfg.pseudo_weight,
        split_batch=cfg.split_batch,
    )
    method = build_method(cfg.method, kernel, model.embedding_dim, num_classes, options)
    return model, kernel, method


# ----------------------------------------------------------------- the result
@dataclass
class RunResult:
    """What a finished run gives back (also saved as summary.json)."""

    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Trains one method on one labelled split; see the module docstring for outputs."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        data: PreparedData | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg.resolved()
        self.resume = resume
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(self.cfg.device)
        self.run_dir = Path(run_dir) if run_dir is not None else unique_run_dir(self.cfg.save_dir, str(self.cfg.name))
        self._new_run_dir = run_dir is None  # made at run(), atomically; a given one is used as it is
        self._lock: Any = None
        self._seconds_before = 0.0  # training time before a resume (saved in last.pt)
        self.data = data
        self.history: list[dict[str, Any]] = []
        self._log_handler: logging.Handler | None = None
        self.dist = dist_utils.SINGLE
        # (unlabelled indices, pseudo-labels, neighbour lists) of the confident images; None before the first labelling
        self.pseudo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------- building
    def _build(self) -> None:
        cfg, data = self.cfg, self.data
        assert data is not None
        self.model, self.kernel, self.method = build_components(cfg, data.train.channels, len(data.classes), pretrained=cfg.pretrained)
        self.model.to(self.device)
        self.method.to(self.device)
        if cfg.sync_bn and self.dist.enabled:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # The training forward may be compiled; it shares its parameters with self.model,
        # which is what is evaluated and saved.
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        # With frozen stages, un-augmented images go through them once (kept in memory).
        self.frozen_cache = FrozenFeatureCache(
            self.model,
            max_bytes=int(cfg.frozen_cache_gb * 2**30),
            batch_size=max(256, cfg.batch_size),
            device=self.device,
            mean=cfg.mean,
            std=cfg.std,
            channels_last=cfg.channels_last,
        )
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        # Mixup pairs are drawn inside each process's slice of the batch, from its own generator.
        self.mix_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000003 * self.dist.rank)

    def _build_optimizer(self) -> None:
        params = [p for p in list(self.model.parameters()) + list(self.method.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.cfg, params)
        # The step runs through DistributedDataParallel when there are several processes;
        # it is built here, once the kernel weights exist.
        self.step_fn = dist_utils.wrap_step(self.model, self.method, self.train_model, self.device, self.dist)

    def _loader(self):
        from .data.batches import BatchLoader

        cfg = self.cfg
        train = self.data.train
        return BatchLoader(
            train.images,
            train.labels,
            cfg.batch_size,
            shuffle=True,
            drop_last=len(train) > cfg.batch_size,
            augmentation=training_augmentation(cfg),
            mean=cfg.mean,
            std=cfg.std,
            device=self.device,
            generator=self.data_gen,
            channels_last=cfg.channels_last,
            shard=(self.dist.rank, self.dist.world_size),
        )

    # --------------------------------------------------------- centres, eval
    def _autocast(self) -> Any:
        """bfloat16 autocast with --amp bf16 (the kernel classifier itself stays in float32)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16")

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self._autocast():
            kept = self.frozen_cache.embed(images, flip_average=self.cfg.tta_flip)
            if kept is not None:
                return kept
            return compute_embeddings(
                self.model,
                images,
                batch_size=max(256, self.cfg.batch_size),
                device=self.device,
                mean=self.cfg.mean,
                std=self.cfg.std,
                channels_last=self.cfg.channels_last,
                flip_average=self.cfg.tta_flip,
            )

    def _recalibrate_bn(self) -> None:
        """Re-estimate the trainable BatchNorm layers' statistics on the labelled images.

        Under the same autocast as the training steps (whose statistics these stand in
        for) and the centres. With frozen stages their kept outputs are used.
        """
        from .data.batches import normalized_batches

        cfg, images = self.cfg, self.data.train.images
        rows = recalibration_rows(len(images), cfg.recalibrate_bn_images, cfg.seed)
        with self._autocast():
            kept = self.frozen_cache.feature_batches(images, rows)
            if kept is not None:
                recalibrate_batchnorm(self.model, kept, forward=self.model.embed_frozen_features)
            else:
                chosen = images if rows is None else images[rows]
                batches = normalized_batches(
                    chosen, max(256, cfg.batch_size), device=self.device, mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last
                )
                recalibrate_batchnorm(self.model, batches)

    def refresh_centres(self) -> float:
        """Recompute every centre and the training neighbour lists; returns seconds.

        With ``recalibrate_bn`` (ours) BatchNorm statistics are first re-estimated on the
        labelled images, so the eval-mode centres match the train-mode embeddings. With
        several processes each embeds and searches for its shard of the labelled images
        and one all-gather gives every process the same centres and neighbour lists.
        """
        t0 = time.perf_counter()
        if self.cfg.recalibrate_bn and not self.cfg.freeze_bn:
            self._recalibrate_bn()
            dist_utils.average_batchnorm_stats_(self.model, self.dist)
        labels = self.data.train.labels.to(self.device)
        with torch.no_grad():
            if not self.dist.enabled:
                self.kernel.set_centres(self._embed(self.data.train.images), labels, len(self.data.classes))
                return time.perf_counter() - t0
            from .neighbours import knn_search

            part = self.dist.shard(len(self.data.train))
            centres = dist_utils.all_gather_rows(self._embed(self.data.train.images[part]), self.dist)
            self.kernel.set_centres(centres, labels, len(self.data.classes), train_neighbours=False)
            own = torch.arange(part.start, part.stop, device=centres.device)
            local = knn_search(centres[part], centres, self.kernel.k, exclude=own, backend=self.kernel.search_backend).indices
            self.kernel.set_training_neighbours(dist_utils.all_gather_rows(local, self.dist))
        return time.perf_counter() - t0

    # ------------------------------------------------------------ pseudo-labels
    def pseudo_label(self, epoch: int) -> dict[str, Any]:
        """Label the unlabelled images with the kernel classifier; keep the confident ones.

        Each unlabelled image gets its K nearest centres, the kernel classifier's class
        probabilities and, when the top probability reaches ``pseudo_threshold``, that
        class as its pseudo-label (kept until the next refresh). With ``pseudo_fraction``
        the images are kept by rank instead (see :func:`select_by_rank`), a share that
        grows with the epoch. With several processes each labels its shard and the
        results are gathered.
        """
        cfg, unl = self.cfg, self.data.unlabelled
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        self.pseudo = (empty, empty, torch.zeros(0, self.kernel.k, dtype=torch.long, device=self.device))
        if unl is None or len(unl) == 0:
            return {"pseudo_n": 0}
        part = self.dist.shard(len(unl)) if self.dist.enabled else slice(0, len(unl))
        idx_all, lab_all, conf_all, nb_all = [], [], [], []
        block = 4096
        with torch.no_grad():
            for start in range(part.start, part.stop, block):
                stop = min(part.stop, start + block)
                emb = self._embed(unl.images[start:stop])
                nbrs = self.kernel.neighbours(emb)
                conf, lab = self._pseudo_probabilities(emb, nbrs).max(1)
                idx_all.append(torch.arange(start, stop, device=self.device))
                lab_all.append(lab)
                conf_all.append(conf)
                nb_all.append(nbrs)
        gather = lambda xs: dist_utils.all_gather_rows(torch.cat(xs), self.dist)  # noqa: E731
        idx, lab, conf, nbrs = gather(idx_all), gather(lab_all), gather(conf_all), gather(nb_all)
        extra: dict[str, Any] = {}
        if cfg.pseudo_fraction is not None:
            share = pseudo_share(cfg, epoch)
            keep = select_by_rank(conf, lab, int(self.kernel.num_classes), share)
            extra["pseudo_target_fraction"] = share
        else:
            keep = conf >= cfg.pseudo_threshold
        self.pseudo = (idx[keep], lab[keep], nbrs[keep])
        n = int(keep.sum())
        right = float((unl.labels.to(self.device)[idx[keep]] == lab[keep]).float().mean()) if n else None
        kept_conf = float(conf[keep].min()) if n else None
        return {"pseudo_n": n, "pseudo_fraction": n / len(unl), "pseudo_label_acc": right, "pseudo_mean_conf": float(conf.mean()), "pseudo_min_conf": kept_conf, **extra}

    def _pseudo_probabilities(self, embeddings: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, C) that label unlabelled images (``pseudo_labeller``)."""
        return labeller_probabilities(self.cfg.pseudo_labeller, self.kernel, embeddings, neighbours, getattr(self.method, "head", None))

    def _labelling_due(self, epoch: int) -> bool:
        """Whether the unlabelled images are (re)labelled before ``epoch`` (0-based).

        The first labelling comes at ``pseudo_start`` (the centres are refreshed for it
        if they are stale), the next ones at the centre refreshes that come at least
        ``update_interval`` epochs after the previous labelling, so a ``pseudo_start``
        just before a refresh does not label everything twice in a row. The epochs
        already labelled are read from the history, so a resumed run keeps the schedule.
        """
        cfg = self.cfg
        if not self.method.uses_unlabelled or cfg.pseudo_online or epoch < int(cfg.pseudo_start or 0):
            return False
        labelled = [int(r["epoch"]) - 1 for r in self.history if "pseudo_n" in r]
        if self.pseudo is None or not labelled:
            return True
        return epoch % cfg.update_interval == 0 and epoch - labelled[-1] >= cfg.update_interval

    def _pseudo_batch(self, batch_size: int, epoch: int) -> Any:
        """A random batch of pseudo-labelled images, augmented like the labelled ones, and
        with RandAugment under ``--pseudo_augment randaugment`` (drawn for the global batch,
        then this process's slice). Under ``--pseudo_online`` they are labelled here."""
        from .data.batches import augment_batch, normalize_batch
        from .data.randaugment import randaugment_batch
        from .methods import PseudoBatch

        cfg = self.cfg
        if cfg.pseudo_online:
            drawn = self._label_online(batch_size) if epoch >= int(cfg.pseudo_start or 0) else None
            if drawn is None:
                return None
            rows, lab, nbrs = drawn
        else:
            if self.pseudo is None or self.pseudo[0].numel() == 0:
                return None
            idx, lab, nbrs = self.pseudo
            total = batch_size * self.dist.world_size
            pick = torch.randint(0, idx.numel(), (total,), generator=self.data_gen).to(self.device)
            if self.dist.enabled:
                pick = pick[self.dist.shard(total)]
            rows, lab, nbrs = idx[pick], lab[pick], nbrs[pick]
        images = self.data.unlabelled.images.index_select(0, rows.cpu()).to(self.device)
        aug = training_augmentation(cfg)
        if aug.active:
            images = augment_batch(images, aug, self.data_gen)
        if cfg.pseudo_augment == "randaugment":  # the strong view, on top of the labelled images' augmentation
            images = randaugment_batch(images, strong_augmentation(cfg), self.data_gen)
        x = normalize_batch(images, cfg.mean, cfg.std)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return PseudoBatch(x, lab, nbrs)

    def _label_online(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``--pseudo_online``: draw ``batch_size`` unlabelled images (this process's slice of
        the global draw), label them with the current model and keep the confident ones.

        Each image is embedded as it is (no augmentation: FixMatch's weak view) with the
        model in eval mode, through the frozen-stage cache when it holds the unlabelled
        set. The labeller (``--pseudo_labeller``) gives a class and a confidence; the
        images whose confidence reaches ``--pseudo_threshold`` are kept, and the batch is
        filled up by drawing again among them (each copy gets its own augmentation).
        Returns (rows of the unlabelled set, labels, K nearest centres), or None when no
        image is confident.
        """
        from .data.batches import normalize_batch

        cfg, unl = self.cfg, self.data.unlabelled
        if unl is None or len(unl) == 0:
            return None
        total = batch_size * self.dist.world_size
        rows = torch.randint(0, len(unl), (total,), generator=self.data_gen)
        if self.dist.enabled:
            rows = rows[self.dist.shard(total)]
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                kept = self.frozen_cache.features(unl.images)
                if kept is not None:
                    emb = self.model.embed_frozen_features(kept[rows.to(kept.device)]).float()
                else:
                    x = normalize_batch(unl.images.index_select(0, rows).to(self.device), cfg.mean, cfg.std)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    emb = self.model(x).float()
                nbrs = self.kernel.neighbours(emb)
                conf, lab = self._pseudo_probabilities(emb, nbrs).max(1)
        finally:
            self.model.train()
            if cfg.freeze_bn:
                set_batchnorm_eval(self.model)
        keep = (conf >= cfg.pseudo_threshold).nonzero().flatten()
        rows = rows.to(self.device)
        stats = self._online_stats
        stats["drawn"] += rows.numel()
        stats["kept"] += keep.numel()
        stats["right"] += int((unl.labels.to(self.device)[rows[keep]] == lab[keep]).sum())  # a diagnostic only
        if keep.numel() == 0:
            return None
        if keep.numel() < rows.numel():
            extra = torch.randint(0, keep.numel(), (rows.numel() - keep.numel(),), generator=self.data_gen).to(keep.device)
            keep = torch.cat([keep, keep[extra]])
        return rows[keep], lab[keep], nbrs[keep]

    def evaluate_split(self, images_set: Any, retrieval: bool) -> dict[str, Any]:
        """Metrics of one split. With several processes each embeds its shard, the
        embeddings are gathered once and rank 0's metrics are shared with the others."""
        if len(images_set) == 0:
            return {}
        if not self.dist.enabled:
            emb = self._embed(images_set.images)
        else:
            emb = dist_utils.all_gather_rows(self._embed(images_set.images[self.dist.shard(len(images_set))]), self.dist)
        self._last_embeddings = emb
        metrics = None
        if self.dist.is_main:
            metrics = evaluate_embeddings(self.kernel, emb, images_set.labels.to(self.device), knn_k=self.cfg.knn_k, retrieval=retrieval, seed=self.cfg.seed)
        return dist_utils.broadcast_object(metrics, self.dist)

    # -------------------------------------------------------------- the loop
    def train_epoch(self, epoch: int, total_steps: int) -> dict[str, Any]:
        cfg = self.cfg
        loader = self._loader()
        self.model.train()
        self.method.train()
        if cfg.freeze_bn:
            set_batchnorm_eval(self.model)
        sums: dict[str, torch.Tensor | float] = {}
        self._online_stats = {"drawn": 0, "kept": 0, "right": 0}
        correct = seen = 0
        steps = len(loader)
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", enabled=cfg.progress and self.dist.is_main, leave=False)
        for i, batch in enumerate(bar):
            step = epoch * steps + i
            lr = learning_rate_at(cfg, step, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            extra = {}
            if self.method.uses_unlabelled:
                extra["pseudo"] = self._pseudo_batch(batch.images.shape[0] * cfg.pseudo_ratio, epoch)
            with self._autocast():
                out = self.step_fn(batch.images, batch.labels, batch.indices, self.mix_gen, **extra)
            if not torch.isfinite(out.loss):
                raise TrainingError(
                    f"the loss became {out.loss.item()} at epoch {epoch + 1}, step {i + 1}; the last good checkpoint "
                    f"(end of epoch {epoch}) is kept in {self.run_dir / 'last.pt'}. Lower --learning_rate, or raise --sigma"
                )
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            self.optimizer.step()
            sums["loss"] = sums.get("loss", 0.0) + out.loss.detach()
            for key, value in out.parts.items():
                sums[key] = sums.get(key, 0.0) + value
            if out.predictions is not None:
                correct += (out.predictions == out.targets).sum()
                seen += out.targets.numel()
        online = {f"_online_{k}": float(v) for k, v in self._online_stats.items()}
        totals = dist_utils.sum_scalars({k: float(v) for k, v in sums.items()} | {"_correct": float(correct), "_seen": float(seen)} | online, self.dist)
        correct, seen = totals.pop("_correct"), totals.pop("_seen")
        drawn, kept, right = (totals.pop(f"_online_{k}") for k in ("drawn", "kept", "right"))
        row: dict[str, Any] = {k: v / max(1, steps * self.dist.world_size) for k, v in totals.items()}
        if drawn:  # --pseudo_online: the share of drawn images confident enough, and how many of their labels are right
            row["pseudo_fraction"] = kept / drawn
            row["pseudo_label_acc"] = right / kept if kept else None
        row["train_acc"] = correct / seen if seen else None
        row["lr"] = lr if steps else cfg.learning_rate
        return row

    def _state(self, epoch: int, best: dict[str, Any], centres_fresh: bool) -> dict[str, Any]:
        return {
            "format": "mbdml-run-1",
            "epoch": epoch,  # epochs completed
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_gen": self.data_gen.get_state(),
            "mix_gen": self.mix_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "world_size": self.dist.world_size,
            # each process draws its own Mixup pairs: all their generator states
            "mix_gen_ranks": dist_utils.gather_objects(self.mix_gen.get_state(), self.dist),
            "torch_rng_ranks": dist_utils.gather_objects(torch.get_rng_state(), self.dist),
            "history": self.history,
            "best": best,
            "centres_fresh": centres_fresh,
            "pseudo": None if self.pseudo is None else [self.pseudo[0].cpu(), self.pseudo[1].cpu(), self.pseudo[2].int().cpu()],
            "classes": list(self.data.classes),
            "image_shape": list(self.data.train.images.shape[1:]),  # (C, H, W) the network was trained on
            "config": self.cfg.to_dict(),
            "seconds": self._seconds_before + time.perf_counter() - self._t_start,
        }

    def _restore(self) -> tuple[int, dict[str, Any], bool]:
        state = load_checkpoint(self.run_dir / "last.pt", map_location=self.device)
        check_resume_state(state, self.run_dir / "last.pt")
        self._seconds_before = float(state.get("seconds", 0.0))
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
            self._build_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            saved_world = int(state.get("world_size", 1))
            if saved_world != self.dist.world_size:
                raise CheckpointError(
                    f"{self.run_dir} was trained with {saved_world} process(es) and is resumed with {self.dist.world_size}; "
                    f"the batches would differ: resume with {saved_world} process(es)"
                )
            self.data_gen.set_state(state["data_gen"])
            self.mix_gen.set_state(state.get("mix_gen_ranks", [state["mix_gen"]])[self.dist.rank])
            torch.set_rng_state(state.get("torch_rng_ranks", [state["torch_rng"]])[self.dist.rank])
        except CheckpointError:
            raise
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{self.run_dir / 'last.pt'} does not match this run's configuration ({exc}); start a new run instead of --resume") from None
        self.history = list(state["history"])
        if state.get("pseudo") is not None:
            idx, lab, nbrs = state["pseudo"]
            self.pseudo = (idx.to(self.device), lab.to(self.device), nbrs.long().to(self.device))
        return int(state["epoch"]), dict(state["best"]), bool(state.get("centres_fresh", False))

    def run(self) -> RunResult:
        """Train (or resume), evaluate, save; returns the summary.

        Under torchrun (WORLD_SIZE > 1) this process joins the job first; see
        :mod:`mbdml.distributed` for what is shared between the processes.
        """
        self.dist = dist_utils.init_distributed(self.device.type, self.cfg.dist_timeout)
        clean = False
        try:
            if self.dist.is_main:
                self._claim_run_dir()
            if self.dist.enabled:
                self._join_job()
            if self.dist.is_main:
                self._start_log_file()
            try:
                result = self._run()
                clean = True
                return result
            except BaseException as exc:
                self._log_failure(exc)
                if isinstance(exc, Exception) and self.dist.enabled and dist_utils.is_collective_failure(exc):
                    raise dist_utils.lost_peer_error(exc, self.dist, self.run_dir) from None
                raise
            finally:
                self._stop_log_file()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            dist_utils.shutdown(self.dist, clean=clean)

    def _claim_run_dir(self) -> None:
        """Create the run folder (a new name atomically) and lock it against a second writer."""
        if self._new_run_dir:
            self.run_dir, self._lock = claim_new_run_dir(self.cfg.save_dir, str(self.cfg.name))
            self._new_run_dir = False
        else:
            self._lock = claim_run_dir(self.run_dir)

    def _log_failure(self, exc: BaseException) -> None:
        """Put why the run stopped into train.log (the command line prints it to the terminal)."""
        if self._log_handler is None:
            return
        if isinstance(exc, KeyboardInterrupt):
            msg, exc_info = "interrupted; continue with 'mbdml train --resume %s'" % self.run_dir, None
        elif isinstance(exc, MbdmlError):
            msg, exc_info = str(exc), None
        else:
            msg, exc_info = f"{type(exc).__name__}: {exc}", (type(exc), exc, exc.__traceback__)
        self._log_handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run stopped: %s", (msg,), exc_info))

    def _join_job(self) -> None:
        """Per-process device, logging and the run folder chosen by rank 0."""
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:
            log.setLevel(logging.WARNING)
        self.run_dir = Path(dist_utils.broadcast_object(str(self.run_dir), self.dist))
        if self.cfg.centre_momentum is not None:
            raise ConfigError("--centre_momentum (a memory bank of centres) is not supported with several processes yet; drop it, or train with one process")
        if self.cfg.teacher_epochs is not None:
            raise ConfigError(
                "--teacher_epochs (the teacher trained in the same run) is not supported with several processes yet: train "
                "the teacher as a run of its own, then the student with --teacher FOLDER"
            )
        if self.cfg.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm); on CPUs each process keeps its own BatchNorm batch statistics")

    def _run(self) -> RunResult:
        # --amp auto becomes bf16 or none for this device; the saved configuration holds
        # what was used, so the run is repeated as it ran.
        self.cfg = dataclasses.replace(self.cfg, amp=resolve_amp(self.cfg.amp, self.device))
        cfg = self.cfg
        t_start = self._t_start = time.perf_counter()
        if self.data is None:
            self.data = prepare_data(cfg)
        self.cfg = cfg = cfg.with_data(self.data.train.channels, min(self.data.train.image_size))
        self.teacher_stats: dict[str, Any] = {}
        shared = None
        # With --teacher_epochs the run folder holds the teacher stage too: an interrupted
        # run resumes in it, before the student has a checkpoint of its own.
        student_started = (self.run_dir / "last.pt").is_file()
        if cfg.teacher is not None or cfg.teacher_epochs is not None:
            from .self_training import apply_teacher

            if cfg.teacher_epochs is not None and not self.resume and self.dist.is_main:
                cfg.save(self.run_dir / "config.json")
            self.data, self.teacher_stats, shared = apply_teacher(cfg, self.data, self.device, self.run_dir, reuse=self.resume, dist=self.dist)
        data = self.data
        n_centres = len(data.train)
        if cfg.k >= n_centres:
            log.warning(
                "K=%d is not smaller than the %d labelled training images: each training sample uses all %d other "
                "centres (its own is never used) and each query all %d. Pass --k %d or less to silence this.",
                cfg.k, n_centres, n_centres - 1, n_centres, max(1, n_centres - 1),
            )
        if self.dist.enabled and n_centres < cfg.batch_size * self.dist.world_size:
            raise ConfigError(
                f"the {n_centres} labelled training images do not fill one global batch of {self.dist.world_size} processes x "
                f"--batch_size {cfg.batch_size}; lower --batch_size or start fewer processes"
            )
        seed_everything(cfg.seed, cfg.deterministic)
        self.allocator = keep_freed_memory() if cfg.keep_freed_memory else "left as it is (--keep_freed_memory false)"
        log.debug("memory allocator: %s", self.allocator)
        self._build()
        if cfg.student_init == "teacher" and not (self.resume and student_started):
            from .self_training import start_from_teacher

            copied = start_from_teacher(self.model, self.method, cfg, self.run_dir)
            log.info("the student starts from its teacher's network%s", f" and {', '.join(copied)}" if copied else "")
        if shared is not None:
            kept = shared.give_to(self.frozen_cache, cfg)
            log.info("the student takes over the teacher's frozen-stage features of %d image sets", kept)
            del shared
        if self.resume and student_started:
            start_epoch, best, centres_fresh = self._restore()
            log.info("resuming %s after epoch %d", self.run_dir, start_epoch)
        else:
            if self.dist.is_main:
                cfg.save(self.run_dir / "config.json")
                save_json(environment_info() | {"device": str(self.device), "world_size": self.dist.world_size, "allocator": self.allocator},
                          self.run_dir / "environment.json")
            self.refresh_centres()
            self._build_optimizer()  # after the first refresh: the kernel weights exist now
            start_epoch, best = 0, {}
            centres_fresh = True
        log.info(
            "%s on %s: %d labelled training images (%d validation, %d unlabelled %s), %d test images, %d classes, device %s",
            cfg.method, cfg.dataset, n_centres, len(data.val), data.unlabelled_count,
            "for pseudo-labels" if self.method.uses_unlabelled else "unused", len(data.test), len(data.classes), self.device,
        )
        steps_per_epoch = len(self._loader())
        total_steps = steps_per_epoch * cfg.max_epochs
        for epoch in range(start_epoch, cfg.max_epochs):
            t0 = time.perf_counter()
            refresh_s = 0.0
            # Methods whose loss never reads the centres (softmax, mixup, the pair- and
            # proxy-based baselines) only need them for evaluation, refreshed there.
            trains_on_centres = self.method.uses_kernel_loss or self.method.uses_unlabelled
            labelling = self._labelling_due(epoch)
            if trains_on_centres and (epoch % cfg.update_interval == 0 or labelling) and not centres_fresh:
                refresh_s = self.refresh_centres()
            row = {"epoch": epoch + 1}
            if labelling:
                t_pl = time.perf_counter()
                row.update(self.pseudo_label(epoch))
                refresh_s += time.perf_counter() - t_pl
            row.update(self.train_epoch(epoch, total_steps))
            train_s = time.perf_counter() - t0
            centres_fresh = False
            last = epoch + 1 == cfg.max_epochs
            if (epoch + 1) % int(cfg.eval_every) == 0 or last:
                refresh_s += self.refresh_centres()
                centres_fresh = True
                t_eval = time.perf_counter()
                val = self.evaluate_split(data.val, retrieval=False)
                # Retrieval metrics (MAP@R, NMI: k-means) cost more than the rest: final model only.
                test = self.evaluate_split(data.test, retrieval=cfg.retrieval_metrics and last)
                if cfg.tsne_graph and len(data.test):
                    self._keep_tsne_frame(epoch + 1)
                row.update({f"val_{k}": v for k, v in val.items()})
                row.update({f"test_{k}": v for k, v in test.items()})
                row["val_acc"] = val.get("nngk_acc")
                row["test_acc"] = test.get("nngk_acc")
                row["eval_s"] = time.perf_counter() - t_eval
                best = self._update_best(best, row)
            row["train_s"] = train_s
            row["refresh_s"] = refresh_s
            row["epoch_s"] = time.perf_counter() - t0
            self.history.append(row)
            state = self._state(epoch + 1, best, centres_fresh)  # a collective: every process builds it
            if self.dist.is_main:
                save_checkpoint(state, self.run_dir / "last.pt")
                write_csv(self.history, self.run_dir / "metrics.csv")
                self._tensorboard(row)
            log.info(
                "epoch %d/%d  loss %.4f  train %s  val %s  test %s  (%.1fs)",
                epoch + 1, cfg.max_epochs, row["loss"], _fmt(row.get("train_acc")), _fmt(row.get("val_acc")), _fmt(row.get("test_acc")), row["epoch_s"],
            )
            if self.on_epoch_end is not None:
                self.on_epoch_end(row)
        summary = self._summarise(best, self._seconds_before + time.perf_counter() - t_start)
        if self.dist.is_main:
            save_json(summary, self.run_dir / "summary.json")
            self._plots()
        return RunResult(self.run_dir, summary, self.history)

    def _keep_tsne_frame(self, epoch: int) -> None:
        """A fixed random subset of the test embeddings at this evaluation, for the GIF."""
        if not hasattr(self, "_tsne_subset"):
            gen = torch.Generator().manual_seed(self.cfg.seed)
            self._tsne_subset = torch.randperm(len(self.data.test), generator=gen)[:1000]
            self._tsne_frames: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        sub = self._tsne_subset
        self._tsne_frames.append((f"test embeddings, epoch {epoch}", self._last_embeddings[sub.to(self._last_embeddings.device)].cpu(), self.data.test.labels[sub]))

    def _update_best(self, best: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        best = dict(best)
        val_acc = row.get("val_acc")
        if val_acc is not None and val_acc > best.get("val_acc", -1.0):
            best.update(val_acc=val_acc, val_epoch=row["epoch"])
        if val_acc is not None and best.get("val_epoch") == row["epoch"] and self.dist.is_main:
            save_checkpoint(
                {"format": "mbdml-model-1", "epoch": row["epoch"], "model": self.model.state_dict(), "method": self.method.state_dict(),
                 "classes": list(self.data.classes), "image_shape": list(self.data.train.images.shape[1:]), "config": self.cfg.to_dict()},
                self.run_dir / "best.pt",
            )
        test_acc = row.get("test_acc")
        if test_acc is not None and test_acc > best.get("test_acc", -1.0):
            best.update(test_acc=test_acc, test_epoch=row["epoch"])
        return best

    def _summarise(self, best: dict[str, Any], seconds: float) -> dict[str, Any]:
        evaluated = [r for r in self.history if r.get("test_acc") is not None]
        final = evaluated[-1] if evaluated else {}
        by_epoch = {r["epoch"]: r for r in evaluated}
        chosen = by_epoch.get(best.get("val_epoch"), {})

        def pick(row: dict[str, Any]) -> dict[str, Any]:
            return {k: row.get(f"test_{k}") for k in METRIC_KEYS}

        train_times = [r["train_s"] for r in self.history]
        return {
            "method": self.cfg.method,
            "dataset": self.cfg.dataset,
            "seed": self.cfg.seed,
            "run": self.cfg.run,
            "epochs": len(self.history),
            "labelled_train": len(self.data.train),
            "validation": len(self.data.val),
            "test": len(self.data.test),
            "final": {"epoch": final.get("epoch"), "val_acc": final.get("val_acc"), **pick(final)},
            "best_val": {"epoch": best.get("val_epoch"), "val_acc": best.get("val_acc"), **pick(chosen)},
            "authors_best_on_test": {
                "epoch": best.get("test_epoch"),
                "nngk_acc": best.get("test_acc"),
                "note": "model chosen on the test set, as the authors did; optimistic, for comparison with the paper only",
            },
            **({"self_training": self.teacher_stats} if self.teacher_stats else {}),
            "seconds": seconds,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_seconds_per_epoch": sum(train_times) / len(train_times) if train_times else None,
            "processes": self.dist.world_size,
            "run_dir": str(self.run_dir),
        }

    def _plots(self) -> None:
        try:
            from .plots import plot_accuracy_curves

            plot_accuracy_curves(self.history, self.run_dir / "accuracy.png", title=f"{self.cfg.method} on {self.cfg.dataset}")
            if self.cfg.tsne_graph:
                from .plots import save_tsne_pair

                train_emb = self._embed(self.data.train.images).cpu()
                test_emb = self._embed(self.data.test.images).cpu()
                save_tsne_pair(train_emb, self.data.train.labels, test_emb, self.data.test.labels, self.run_dir, class_names=self.data.classes, seed=self.cfg.seed)
                frames = getattr(self, "_tsne_frames", [])
                if frames:
                    from .plots import save_tsne_gif

                    step = max(1, math.ceil(len(frames) / 12))  # at most about 12 frames
                    chosen = frames[::step] if frames[::step][-1] is frames[-1] else frames[::step] + [frames[-1]]
                    save_tsne_gif(chosen, self.run_dir / "tsne_test_epochs.gif", class_names=self.data.classes, seed=self.cfg.seed)
        except Exception as exc:  # a plot must never lose a finished run
            log.warning("could not draw the plots (%s); the metrics are in %s", exc, self.run_dir / "metrics.csv")

    def _start_log_file(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        self._log_handler = handler

    def _stop_log_file(self) -> None:
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        writer = getattr(self, "_tb_writer", None)
        if writer:
            writer.close()
            self._tb_writer = None

    def _tensorboard(self, row: dict[str, Any]) -> None:
        """Per-epoch scalars to RUN_DIR/tensorboard when tensorboard is installed (the
        authors logged there); without it nothing is lost, metrics.csv has them all."""
        writer = getattr(self, "_tb_writer", None)
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb_writer = False
                return
            writer = self._tb_writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if writer is False:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()


def progress_bar(iterable: Any = None, *, desc: str, enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), or None / the
    iterable itself when progress display is off or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            enabled = False
    if not enabled:
        return iterable
    return tqdm(iterable, desc=desc, dynamic_ncols=True, mininterval=1.0, **kwargs)


def train(cfg: RunConfig, **kwargs: Any) -> RunResult:
    """Train one run with ``cfg``; see :class:`Trainer` for the options."""
    return Trainer(cfg, **kwargs).run()


def resume(run_dir: str | Path, **kwargs: Any) -> RunResult:
    """Continue an interrupted run from its last checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no run folder at {run_dir}; pass the folder printed when the run started")
    cfg = RunConfig.load(run_dir / "config.json")
    teacher_stage = cfg.teacher_epochs is not None and (run_dir / "teacher" / "last.pt").is_file()
    if not (run_dir / "last.pt").is_file() and not teacher_stage:
        raise CheckpointError(f"{run_dir} has no last.pt: the run stopped before its first epoch ended; start it again without --resume")
    return Trainer(cfg, run_dir=run_dir, resume=True, **kwargs).run()


# ----------------------------------------------------------- loading a run back
@dataclass
class LoadedRun:
    """A trained model with its kernel classifier, read back from a run folder."""

    config: RunConfig
    model: EmbeddingNet
    method: Method
    kernel: NNGKClassifier
    classes: list[str] | None
    epoch: int
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the training images; None in runs saved before it was kept


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu") -> LoadedRun:
    """Rebuild the model and kernel of a saved run (``which``: best or last checkpoint)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no run folder at {run_dir}")
    cfg = RunConfig.load(run_dir / "config.json").resolved()
    path = run_dir / f"{which}.pt"
    if which == "best" and not path.is_file():
        path = run_dir / "last.pt"  # no validation split: the final model
    state = load_checkpoint(path, map_location=device)
    check_model_state(state, path)
    kernel_state = {k[len("kernel."):]: v for k, v in state["method"].items() if k.startswith("kernel.")}
    num_classes = int(kernel_state["_num_classes_buf"])
    model, kernel, method = build_components(cfg, _in_channels(state["model"]), num_classes)
    try:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match the configuration in {run_dir / 'config.json'} ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    method.to(device).eval()
    classes = state.get("classes")
    shape = state.get("image_shape")
    if shape is None and cfg.input_size is not None:  # resized at load: the size is in the configuration
        shape = [_in_channels(state["model"]), cfg.input_size, cfg.input_size]
    image_shape = tuple(int(v) for v in shape) if isinstance(shape, (list, tuple)) and len(shape) == 3 else None
    return LoadedRun(cfg, model, method, kernel, list(classes) if classes else None, int(state.get("epoch", 0)), image_shape)  # type: ignore[arg-type]


def _in_channels(model_state: dict[str, torch.Tensor]) -> int:
    for key, value in model_state.items():
        if value.dim() == 4:  # the first convolution's weight
            return int(value.shape[1])
    raise CheckpointError("the checkpoint holds no convolution weights; it was not written by mbdml")
