"""Semi-supervision: the methods ``mbdml_semi`` and ``mbdml1_semi`` also train on the
unlabelled images, with pseudo-labels given by the model being trained.

Two algorithms on the engine (:class:`mbdml.engine.Trainer`), sharing one
:class:`~mbdml.pseudo_labels.PseudoLabeller` and one way of drawing pseudo-labelled
batches:

- :class:`RefreshLabelling` (the default) labels every unlabelled image at the centre
  refreshes, from ``--pseudo_start`` on, keeps the surest (``--pseudo_threshold``, or by
  rank: ``--pseudo_fraction``, a share growing over the epochs), and draws
  ``--pseudo_ratio`` of them per labelled image at each step.
- :class:`OnlineLabelling` (``--pseudo_online``) labels the images drawn at each step
  with the current model, FixMatch-style (the weak view: the un-augmented image), and
  trains on those whose confidence reaches ``--pseudo_threshold``.

Pseudo-labelled images are augmented like the labelled ones, and with
``--pseudo_augment randaugment`` also by RandAugment (FixMatch's strong view).
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import EntryRule
from .config import RunConfig
from .data.batches import augment_batch, normalize_batch
from .data.randaugment import RandAugment, randaugment_batch
from .engine import Algorithm, Trainer
from .errors import ConfigError
from .methods import METHODS, PseudoBatch
from .pseudo_labels import Labelled, PseudoLabeller, pseudo_label_accuracy, pseudo_label_hits, select_pseudo_labels
from .training_data import training_augmentation


def strong_augmentation(cfg: RunConfig) -> RandAugment:
    """The RandAugment of ``--pseudo_augment randaugment``, filled with the normalisation
    mean (so a Cutout square, and what a rotation or shift brings in, is 0 once normalised)."""
    fill = tuple(255.0 * m for m in cfg.mean)
    return RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude, fill=fill)


def pseudo_share(cfg: RunConfig, epoch: int) -> float:
    """The share of the unlabelled images kept at a labelling in ``epoch`` (0-based):
    from ``update_interval`` epochs' worth at ``pseudo_start`` up to ``pseudo_fraction``
    at the last epoch, linearly (a curriculum: the surest images first)."""
    start = int(cfg.pseudo_start or 0)
    span = max(1, cfg.max_epochs - start)
    return float(cfg.pseudo_fraction) * min(1.0, (epoch - start + cfg.update_interval) / span)


def _semi_methods() -> list[str]:
    return [name for name, cls in METHODS.items() if cls.uses_unlabelled]


class PseudoLabelTraining(Algorithm):
    """What both semi-supervised algorithms share: their options, their checks, the
    labeller, and how a pseudo-labelled batch is made from labelled rows."""

    feeds_unlabelled = True

    def __init__(self, cfg: RunConfig) -> None:
        """The options of ``cfg`` (resolved) that this algorithm owns: pseudo_* and randaugment_*."""
        self.threshold = cfg.pseudo_threshold
        self.start = int(cfg.pseudo_start or 0)
        self.ratio = cfg.pseudo_ratio
        self.labeller = cfg.pseudo_labeller
        self.strong = strong_augmentation(cfg) if cfg.pseudo_augment == "randaugment" else None

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        method_cls = METHODS[cfg.method]
        if cfg.pseudo_online and cfg.pseudo_fraction is not None:
            raise ConfigError(
                "--pseudo_online labels the images drawn at each step and keeps those whose confidence reaches "
                "--pseudo_threshold; --pseudo_fraction ranks the whole unlabelled set at a refresh: drop one of the two"
            )
        if cfg.pseudo_augment != "standard" and not method_cls.uses_unlabelled:
            raise ConfigError(
                f"--pseudo_augment {cfg.pseudo_augment} augments the pseudo-labelled images, and method {cfg.method} has "
                f"none; use a semi-supervised method ({', '.join(_semi_methods())}) or drop --pseudo_augment"
            )
        if cfg.pseudo_online and not method_cls.uses_unlabelled:
            raise ConfigError(
                f"--pseudo_online labels unlabelled images as they are drawn, and method {cfg.method} trains on none; "
                f"use a semi-supervised method ({', '.join(_semi_methods())}) or drop --pseudo_online"
            )
        if cfg.pseudo_labeller in ("head", "mean") and method_cls.uses_unlabelled and not method_cls.has_head:
            with_head = [name for name, c in METHODS.items() if c.uses_unlabelled and c.has_head]
            raise ConfigError(
                f"pseudo_labeller {cfg.pseudo_labeller} reads the mixup head's softmax, and method {cfg.method} has no head; "
                f"use --pseudo_labeller kernel, or a method with one: {', '.join(with_head)}"
            )

    def pseudo_labeller(self, trainer: Trainer) -> PseudoLabeller:
        """The labeller on the trainer's kernel classifier (its current centres) and head."""
        return PseudoLabeller(self.labeller, trainer.kernel, getattr(trainer.method, "head", None))

    def step_inputs(self, trainer: Trainer, batch: Any, epoch: int) -> dict[str, Any]:
        """``pseudo_ratio`` pseudo-labelled images per labelled image of ``batch`` (None
        before any is kept: the step is then the supervised method's)."""
        return {"pseudo": self.draw(trainer, batch.images.shape[0] * self.ratio, epoch)}

    def draw(self, trainer: Trainer, batch_size: int, epoch: int) -> PseudoBatch | None:
        """A batch of ``batch_size`` pseudo-labelled images for this process, or None."""
        raise NotImplementedError

    def pseudo_batch(self, trainer: Trainer, drawn: Labelled) -> PseudoBatch:
        """The drawn rows of the unlabelled set as a training batch: augmented like the
        labelled images (from the trainer's data generator), then by RandAugment under
        ``--pseudo_augment randaugment``, normalised."""
        cfg = trainer.cfg
        images = trainer.data.unlabelled.images.index_select(0, drawn.rows.cpu()).to(trainer.device)
        aug = training_augmentation(cfg)
        if aug.active:
            images = augment_batch(images, aug, trainer.data_gen)
        if self.strong is not None:  # the strong view, on top of the labelled images' augmentation
            images = randaugment_batch(images, self.strong, trainer.data_gen)
        x = normalize_batch(images, cfg.mean, cfg.std)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return PseudoBatch(x, drawn.labels, drawn.neighbours)


class RefreshLabelling(PseudoLabelTraining):
    """Label every unlabelled image at the centre refreshes and keep the surest; each
    step draws from the kept ones (with replacement).

    The first labelling comes at ``pseudo_start`` (the centres are refreshed for it if
    they are stale), the next ones at the centre refreshes that come at least
    ``update_interval`` epochs after the previous labelling, so a ``pseudo_start`` just
    before a refresh does not label everything twice in a row. The kept images, their
    labels and neighbour lists are saved with every checkpoint.
    """

    name = "labelling at the centre refreshes"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.fraction = cfg.pseudo_fraction
        self.update_interval = cfg.update_interval
        self.kept: Labelled | None = None  # the kept images; None before the first labelling

    @classmethod
    def applies_to(cls, cfg: RunConfig) -> bool:
        return METHODS[cfg.method].uses_unlabelled and not cfg.pseudo_online

    def labelling_due(self, trainer: Trainer, epoch: int) -> bool:
        if epoch < self.start:
            return False
        labelled = [int(r["epoch"]) - 1 for r in trainer.state.history if "pseudo_n" in r]
        if self.kept is None or not labelled:
            return True
        return epoch % self.update_interval == 0 and epoch - labelled[-1] >= self.update_interval

    def label(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        """Label the unlabelled images with the labeller and keep the confident ones.

        Each unlabelled image gets its K nearest centres, the labeller's class
        probabilities and, when the top probability reaches ``pseudo_threshold``, that
        class as its pseudo-label (kept until the next labelling). With
        ``pseudo_fraction`` the images are kept by rank instead, a share that grows with
        the epoch (:func:`pseudo_share`). With several processes each labels its shard and
        the results are gathered.
        """
        unl, device = trainer.data.unlabelled, trainer.device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        self.kept = Labelled(empty, empty, torch.zeros(0, device=device), torch.zeros(0, trainer.kernel.k, dtype=torch.long, device=device))
        if unl is None or len(unl) == 0:
            return {"pseudo_n": 0}
        labelled = self.pseudo_labeller(trainer).label(unl.images, trainer.embedder, dist=trainer.dist)
        extra: dict[str, Any] = {}
        share = None
        if self.fraction is not None:
            share = pseudo_share(trainer.cfg, epoch)
            extra["pseudo_target_fraction"] = share
        keep = select_pseudo_labels(labelled.confidence, labelled.labels, int(trainer.kernel.num_classes), share, self.threshold)
        self.kept = labelled[keep]
        n = int(keep.sum())
        right = pseudo_label_accuracy(unl.labels.to(device)[self.kept.rows], self.kept.labels)
        return {
            "pseudo_n": n, "pseudo_fraction": n / len(unl), "pseudo_label_acc": right, "pseudo_mean_conf": float(labelled.confidence.mean()),
            "pseudo_min_conf": float(self.kept.confidence.min()) if n else None, **extra,
        }

    def draw(self, trainer: Trainer, batch_size: int, epoch: int) -> PseudoBatch | None:
        """``batch_size`` of the kept images, drawn at random for the global batch (then
        this process's slice)."""
        if self.kept is None or self.kept.rows.numel() == 0:
            return None
        total = batch_size * trainer.dist.world_size
        pick = torch.randint(0, self.kept.rows.numel(), (total,), generator=trainer.data_gen).to(trainer.device)
        if trainer.dist.enabled:
            pick = pick[trainer.dist.shard(total)]
        return self.pseudo_batch(trainer, self.kept[pick])

    def state_dict(self) -> dict[str, Any]:
        kept = self.kept
        return {"pseudo": None if kept is None else [kept.rows.cpu(), kept.labels.cpu(), kept.neighbours.int().cpu()]}

    def state_rules(self) -> list[EntryRule]:
        def three_tensors(v: Any) -> bool:
            return v is None or (isinstance(v, list) and len(v) == 3 and all(isinstance(t, torch.Tensor) for t in v))

        return [("pseudo", False, three_tensors, "none or three tensors: the pseudo-labels")]

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("pseudo") is not None:
            rows, labels, neighbours = state["pseudo"]
            # the confidences are not saved: only the labelling's log reads them
            self.kept = Labelled(rows.to(device), labels.to(device), torch.zeros(rows.shape[0], device=device), neighbours.long().to(device))


class OnlineLabelling(PseudoLabelTraining):
    """``--pseudo_online``: at each step, draw unlabelled images, label them with the
    current model and train on the confident ones (FixMatch's weak view: each image is
    embedded as it is, in eval mode)."""

    name = "labelling at each step"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.counts = {"drawn": 0, "kept": 0, "right": 0, "known": 0}  # this epoch's, for the log

    @classmethod
    def applies_to(cls, cfg: RunConfig) -> bool:
        return METHODS[cfg.method].uses_unlabelled and cfg.pseudo_online

    def start_epoch(self, trainer: Trainer, epoch: int) -> None:
        self.counts = {"drawn": 0, "kept": 0, "right": 0, "known": 0}

    def draw(self, trainer: Trainer, batch_size: int, epoch: int) -> PseudoBatch | None:
        if epoch < self.start:
            return None
        drawn = self.label_drawn(trainer, batch_size)
        return None if drawn is None else self.pseudo_batch(trainer, drawn)

    def label_drawn(self, trainer: Trainer, batch_size: int) -> Labelled | None:
        """Draw ``batch_size`` unlabelled images (this process's slice of the global draw),
        label them with the current model and keep the confident ones.

        Each image is embedded as it is (no augmentation: FixMatch's weak view) with the
        model in eval mode, through the frozen-stage cache when it holds the unlabelled
        set. The labeller (``--pseudo_labeller``) gives a class and a confidence; the
        images whose confidence reaches ``--pseudo_threshold`` are kept, and the batch is
        filled up by drawing again among them (each copy gets its own augmentation).
        Returns the kept rows of the unlabelled set with their labels and K nearest
        centres, or None when no image is confident.
        """
        unl = trainer.data.unlabelled
        if unl is None or len(unl) == 0:
            return None
        total = batch_size * trainer.dist.world_size
        rows = torch.randint(0, len(unl), (total,), generator=trainer.data_gen)
        if trainer.dist.enabled:
            rows = rows[trainer.dist.shard(total)]
        embedder = trainer.embedder
        emb = embedder.embed_rows(unl.images, rows)
        with torch.no_grad(), embedder.autocast():
            conf, lab, nbrs = self.pseudo_labeller(trainer).label_embeddings(emb)
        keep = (conf >= self.threshold).nonzero().flatten()
        rows = rows.to(trainer.device)
        self.counts["drawn"] += rows.numel()
        self.counts["kept"] += keep.numel()
        right, known = pseudo_label_hits(unl.labels.to(trainer.device)[rows[keep]], lab[keep])  # a diagnostic only
        self.counts["right"] += right
        self.counts["known"] += known
        if keep.numel() == 0:
            return None
        if keep.numel() < rows.numel():
            extra = torch.randint(0, keep.numel(), (rows.numel() - keep.numel(),), generator=trainer.data_gen).to(keep.device)
            keep = torch.cat([keep, keep[extra]])
        return Labelled(rows[keep], lab[keep], conf[keep], nbrs[keep])

    def epoch_counts(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.counts.items()}

    def epoch_row(self, counts: dict[str, float]) -> dict[str, Any]:
        """The share of drawn images confident enough, and how many of their labels are right."""
        if not counts.get("drawn"):
            return {}
        known = counts.get("known", 0.0)
        return {"pseudo_fraction": counts["kept"] / counts["drawn"], "pseudo_label_acc": counts["right"] / known if known else None}
