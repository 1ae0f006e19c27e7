"""The training engine: one method on one labelled split, epoch by epoch.

    before the first epoch   the data, the algorithm's preparation (a teacher's labels),
                             the network, kernel classifier and method, the first refresh
    each epoch               refresh the centres when due (SPEC §2), let the algorithm label
                             when due, the steps, evaluate when due (right after a
                             refresh), then the history, checkpoint, metrics and log
    after the last epoch     the summary and the plots

What is not supervised training lives above the engine, in an :class:`Algorithm`: the
labelling of unlabelled images at the refreshes or at each step
(:mod:`mbdml.semi_supervised`) and self-training from a teacher (:mod:`mbdml.self_training`)
plug into the loop through its hooks, and :func:`mbdml.train.build_trainer` picks the
algorithm a configuration asks for. The run's files are written by
:class:`~mbdml.run_folder.RunFolder`.

Every epoch ends with an atomic checkpoint of the whole state (model, kernel weights
and centres, optimiser, random generators, metrics so far, the algorithm's state), so a
run killed at any moment loses at most the epoch it was in: ``mbdml train --resume RUN_DIR``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import distributed as dist_utils
from .checkpoint import EntryRule, check_resume_state, load_checkpoint
from .components import build_components
from .config import RunConfig
from .cpu_memory import keep_freed_memory
from .data.batches import BatchLoader, normalized_batches
from .embedder import Embedder
from .environment import environment_info, resolve_device, seed_everything
from .errors import CheckpointError, ConfigError, TrainingError
from .evaluate import evaluate_embeddings
from .feature_cache import FrozenFeatureCache
from .kernel import NNGKClassifier
from .methods import METHODS, LossOutput, Method
from .models import EmbeddingNet, recalibrate_batchnorm, set_batchnorm_eval
from .neighbours import knn_search
from .optimisation import learning_rate_at, make_optimizer
from .progress import progress_bar
from .run_folder import (
    RunFolder,
    RunFolderLock,
    TsneFrames,
    claim_new_run_dir,
    claim_run_dir,
    next_run_dir,
    percent,
    summarise,
    update_best,
)
from .training_data import PreparedData, prepare_data, training_augmentation

log = logging.getLogger("mbdml")


class Algorithm:
    """What a training algorithm adds to the engine's loop, by hooks; each is called with
    the :class:`Trainer`. This base class adds nothing: plain supervised training.

    A subclass owns its options (read from the configuration), their checks
    (:meth:`check`), its checkpoint state (:meth:`state_dict`) and what it adds to the
    log and the summary.
    """

    name = "supervised training"
    feeds_unlabelled = False  # gives the method's steps pseudo-labelled images

    def __init__(self, cfg: RunConfig | None = None) -> None:
        """``cfg``: the resolved configuration, whose options the algorithm reads (none here)."""

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Refuse values of this algorithm's options that make no sense together (called
        for every configuration, whatever algorithm it asks for)."""

    @classmethod
    def applies_to(cls, cfg: RunConfig) -> bool:
        """Whether ``cfg`` asks for this algorithm: here, a method that trains on labelled
        images only, and no teacher."""
        return not METHODS[cfg.method].uses_unlabelled and cfg.teacher is None and cfg.teacher_epochs is None

    def prepare(self, trainer: "Trainer", data: PreparedData) -> PreparedData:
        """Before the network is built: the data to train on (e.g. with a teacher's labels)."""
        return data

    def after_build(self, trainer: "Trainer") -> None:
        """The network, kernel classifier and method exist; nothing is restored or trained yet."""

    def labelling_due(self, trainer: "Trainer", epoch: int) -> bool:
        """Whether :meth:`label` runs before ``epoch`` (0-based), on freshly refreshed centres."""
        return False

    def label(self, trainer: "Trainer", epoch: int) -> dict[str, Any]:
        """Label before ``epoch``; returns what to log in its row."""
        return {}

    def start_epoch(self, trainer: "Trainer", epoch: int) -> None:
        """Before the first step of ``epoch``."""

    def step_inputs(self, trainer: "Trainer", batch: Any, epoch: int) -> dict[str, Any]:
        """Extra keyword arguments of the method's step on ``batch`` (e.g. ``pseudo``)."""
        return {}

    def epoch_counts(self) -> dict[str, float]:
        """Counts of the epoch's steps, summed over the processes for :meth:`epoch_row`."""
        return {}

    def epoch_row(self, counts: dict[str, float]) -> dict[str, Any]:
        """What to log in the epoch's row, from the summed :meth:`epoch_counts`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Entries of the checkpoint that :meth:`load_state_dict` reads back after a resume."""
        return {}

    def state_rules(self) -> list[EntryRule]:
        """What each of :meth:`state_dict`'s entries must be, checked before a resume reads
        them (see :func:`mbdml.checkpoint.check_entries`)."""
        return []

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Read back :meth:`state_dict`'s entries from a checkpoint."""

    def summary(self) -> dict[str, Any]:
        """Entries of the run's summary.json."""
        return {}


@dataclass
class TrainingState:
    """Where a run stands (saved at every epoch's end, read back by a resume)."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (metrics.csv)
    best: dict[str, Any] = field(default_factory=dict)  # the best evaluations so far (see run_folder.update_best)
    centres_fresh: bool = False  # the centres were refreshed after the last step
    seconds_before: float = 0.0  # the run's time before this process took it up (a resume)


@dataclass
class RunResult:
    """What a finished run gives back (also saved as summary.json)."""

    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains one method on one labelled split with ``algorithm`` (supervised training
    when None; :func:`mbdml.train.build_trainer` gives the one a configuration asks for);
    writes the run folder (see :mod:`mbdml.run_folder`).

    ``data``: the prepared images (default: loaded from ``cfg`` when the run starts).
    ``run_dir``: the run folder (default: a new one under ``cfg.save_dir``, made when the
    run starts: ``cfg.name``, or ``name-2``, ``name-3``... when taken). ``resume``:
    continue the run in ``run_dir`` from its last checkpoint. ``on_epoch_end``: called
    with each epoch's row once it is saved.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        algorithm: Algorithm | None = None,
        data: PreparedData | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg.resolved()  # completed once the device and the images are known (prepare)
        self.algorithm = algorithm if algorithm is not None else Algorithm()
        if not self.algorithm.applies_to(self.cfg):
            raise ConfigError(
                f"this trainer's algorithm ({self.algorithm.name}) is not the one the configuration asks for (method "
                f"{self.cfg.method}, teacher {self.cfg.teacher or self.cfg.teacher_epochs}): build the trainer with "
                "mbdml.train.build_trainer(cfg), which picks it"
            )
        self.data = data
        self.resume = resume
        self.on_epoch_end = on_epoch_end
        self.device = resolve_device(self.cfg.device)
        # A new folder's name is taken when the run starts (claim_new_run_dir); until then, the likely one.
        self.new_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir is not None else next_run_dir(self.cfg.save_dir, str(self.cfg.name))
        self.folder = RunFolder(self.run_dir)
        self.lock: RunFolderLock | None = None  # held by the main process while the run writes its folder
        self.dist = dist_utils.SINGLE  # joined when the run starts (torchrun)
        self.state = TrainingState()
        self.restoring = False  # resuming from this folder's last.pt (set when the run starts)
        self.started = 0.0  # time.perf_counter() when the run started
        self.tsne = TsneFrames(self.cfg.seed)
        # None until prepare() builds them:
        self.model: EmbeddingNet | None = None
        self.train_model: Any = None  # the training forward: the model, or its torch.compile'd view
        self.kernel: NNGKClassifier | None = None
        self.method: Method | None = None
        self.frozen_cache: FrozenFeatureCache | None = None
        self.embedder: Embedder | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.step: Callable[..., LossOutput] | None = None  # one step of the method, data-parallel with several processes
        self.data_gen = torch.Generator().manual_seed(self.cfg.seed)  # batches, augmentation, pseudo-labelled draws
        self.mix_gen = torch.Generator()  # Mixup pairs and lambda, one per process (seeded once it is known)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per finished epoch (what metrics.csv holds)."""
        return self.state.history

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        """Train (or resume), evaluate, save; returns the summary."""
        with self.session():
            self.prepare()
            self.train_epochs()
            return self.finish()

    @contextlib.contextmanager
    def session(self) -> Iterator["Trainer"]:
        """The run's process: the main process claims the run folder (made atomically when
        new, locked against a second writer) and writes the log there; under torchrun
        (WORLD_SIZE > 1) the process joins the job (see :mod:`mbdml.distributed` for what
        the processes share). All end with the block. Why a run stopped goes to its
        train.log; a collective that fails because another process is gone ends it with
        a message that says so."""
        self.dist = dist_utils.init_distributed(self.device.type, self.cfg.dist_timeout)
        clean = False
        try:
            if self.dist.is_main:
                self._claim_run_dir()
            if self.dist.enabled:
                self._join_job()
            if self.dist.is_main:
                self.folder.open()
            try:
                yield self
                clean = True
            except BaseException as exc:
                self.folder.log_failure(exc)
                if isinstance(exc, Exception) and self.dist.enabled and dist_utils.is_collective_failure(exc):
                    raise dist_utils.lost_peer_error(exc, self.dist, self.run_dir) from None
                raise
            finally:
                self.folder.close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            if self.dist.enabled:
                self.step = None  # the data-parallel wrapper goes before its process group
            dist_utils.shutdown(self.dist, clean=clean)

    def _claim_run_dir(self) -> None:
        """Make the run folder (a new name atomically) and lock it against a second writer."""
        if self.new_run_dir:
            self.run_dir, self.lock = claim_new_run_dir(self.cfg.save_dir, str(self.cfg.name))
            self.folder = RunFolder(self.run_dir)
            self.new_run_dir = False
        else:
            self.lock = claim_run_dir(self.run_dir)

    def train_epochs(self) -> None:
        """The loop: from the epoch after the last one saved to ``max_epochs``."""
        cfg = self.cfg
        total_steps = len(self.loader()) * cfg.max_epochs
        for epoch in range(self.state.epoch, cfg.max_epochs):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch + 1}
            labelling = self.algorithm.labelling_due(self, epoch)
            refresh_s = self.refresh_centres() if self.refresh_due(epoch, labelling) else 0.0
            if labelling:
                t_label = time.perf_counter()
                row.update(self.algorithm.label(self, epoch))
                refresh_s += time.perf_counter() - t_label
            row.update(self.train_epoch(epoch, total_steps))
            train_s = time.perf_counter() - t0
            self.state.centres_fresh = False
            last = epoch + 1 == cfg.max_epochs
            if (epoch + 1) % int(cfg.eval_every) == 0 or last:
                refresh_s += self.refresh_centres()
                self.state.centres_fresh = True
                row.update(self.evaluate(epoch, last))
            row.update(train_s=train_s, refresh_s=refresh_s, epoch_s=time.perf_counter() - t0)
            self.end_epoch(row)

    def refresh_due(self, epoch: int, labelling: bool) -> bool:
        """Whether the centres are refreshed before ``epoch``: every ``update_interval``
        epochs and before a labelling, unless fresh already. Methods whose loss never reads
        the centres (softmax, mixup, the pair- and proxy-based baselines) only need them
        for evaluation, where they are refreshed."""
        trains_on_centres = self.method.uses_kernel_loss or self.method.uses_unlabelled
        return trains_on_centres and (epoch % self.cfg.update_interval == 0 or labelling) and not self.state.centres_fresh

    def end_epoch(self, row: dict[str, Any]) -> None:
        """Keep the epoch's row, save the whole state and the metrics, log, call back."""
        cfg = self.cfg
        self.state.history.append(row)
        self.state.epoch = int(row["epoch"])
        state = self.checkpoint_state()  # a collective: every process builds it
        if self.dist.is_main:
            self.folder.save_state(state)
            self.folder.write_metrics(self.state.history)
            self.folder.tensorboard(row)
        log.info(
            "epoch %d/%d  loss %.4f  train %s  val %s  test %s  (%.1fs)",
            row["epoch"], cfg.max_epochs, row["loss"], percent(row.get("train_acc")), percent(row.get("val_acc")),
            percent(row.get("test_acc")), row["epoch_s"],
        )
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)

    def finish(self) -> RunResult:
        """The summary (saved as summary.json) and the plots."""
        train_times = [r["train_s"] for r in self.state.history]
        summary = summarise(
            self.cfg, self.state.history, self.state.best,
            {"labelled_train": len(self.data.train), "validation": len(self.data.val), "test": len(self.data.test)},
            {
                **self.algorithm.summary(),
                "seconds": self.seconds(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "train_seconds_per_epoch": sum(train_times) / len(train_times) if train_times else None,
                "processes": self.dist.world_size,
                "run_dir": str(self.run_dir),
            },
        )
        if self.dist.is_main:
            self.folder.save_summary(summary)
            self._plot()
        return RunResult(self.run_dir, summary, self.state.history)

    # ------------------------------------------------------------- preparing
    def prepare(self) -> None:
        """Everything before the first epoch: the data, the algorithm's preparation, the
        network, kernel classifier and method; then the state of the last checkpoint
        (a resume) or the first refresh of the centres and a new optimiser."""
        self.started = time.perf_counter()
        data = self.data if self.data is not None else prepare_data(self.cfg)
        self.cfg = cfg = self.cfg.for_run(self.device, data.train.channels, min(data.train.image_size))
        self.restoring = self.resume and (self.run_dir / "last.pt").is_file()
        self.data = data = self.algorithm.prepare(self, data)
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
        allocator = keep_freed_memory() if cfg.keep_freed_memory else "left as it is (--keep_freed_memory false)"
        log.debug("memory allocator: %s", allocator)
        self.build()
        self.algorithm.after_build(self)
        if self.restoring:
            self.restore()
            log.info("resuming %s after epoch %d", self.run_dir, self.state.epoch)
        else:
            if self.dist.is_main:
                self.folder.save_config(cfg)
                self.folder.save_environment(
                    environment_info() | {"device": str(self.device), "world_size": self.dist.world_size, "allocator": allocator}
                )
            self.refresh_centres()
            self.build_optimizer()  # after the first refresh: the kernel weights exist now
            self.state = TrainingState(centres_fresh=True)
        log.info(
            "%s on %s: %d labelled training images (%d validation, %d unlabelled %s), %d test images, %d classes, device %s",
            cfg.method, cfg.dataset, n_centres, len(data.val), data.unlabelled_count,
            "for pseudo-labels" if cfg.uses_unlabelled_images() else "unused", len(data.test), len(data.classes), self.device,
        )

    def build(self) -> None:
        """The network, kernel classifier and method, on the device; the frozen-stage
        cache and the embedder; the generators of the Mixup pairs."""
        cfg, data = self.cfg, self.data
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
            self.model, max_bytes=int(cfg.frozen_cache_gb * 2**30), batch_size=max(256, cfg.batch_size), device=self.device,
            mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last,
        )
        self.embedder = Embedder.for_run(self.model, cfg, self.device, cache=self.frozen_cache)
        # Mixup pairs are drawn inside each process's slice of the batch, from its own generator.
        self.mix_gen.manual_seed(cfg.seed + 1 + 1000003 * self.dist.rank)

    def build_optimizer(self) -> None:
        """The optimiser of every trainable parameter, and the step (through
        DistributedDataParallel with several processes; built once the kernel weights exist)."""
        params = [p for p in list(self.model.parameters()) + list(self.method.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.cfg, params)
        self.step = dist_utils.wrap_step(self.model, self.method, self.train_model, self.device, self.dist)

    def loader(self) -> BatchLoader:
        """The labelled training images in shuffled, augmented batches (this process's slice)."""
        cfg = self.cfg
        train = self.data.train
        return BatchLoader(
            train.images, train.labels, cfg.batch_size, shuffle=True, drop_last=len(train) > cfg.batch_size,
            augmentation=training_augmentation(cfg), mean=cfg.mean, std=cfg.std, device=self.device,
            generator=self.data_gen, channels_last=cfg.channels_last, shard=(self.dist.rank, self.dist.world_size),
        )

    # --------------------------------------------------------- centres, eval
    def recalibrate_batchnorm(self) -> None:
        """Re-estimate the trainable BatchNorm layers' statistics on the labelled images
        (``--recalibrate_bn_images``: a fixed subset of them).

        Under the same autocast as the training steps (whose statistics these stand in
        for) and the centres. With frozen stages their kept outputs are used.
        """
        cfg, embedder = self.cfg, self.embedder
        images = self.data.train.images
        rows = recalibration_rows(len(images), cfg.recalibrate_bn_images, cfg.seed)
        with embedder.autocast():
            kept = self.frozen_cache.feature_batches(images, rows)
            if kept is not None:
                recalibrate_batchnorm(self.model, kept, forward=self.model.embed_frozen_features)
            else:
                chosen = images if rows is None else images[rows]
                batches = normalized_batches(
                    chosen, embedder.batch_size, device=self.device, mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last
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
            self.recalibrate_batchnorm()
            dist_utils.average_batchnorm_stats_(self.model, self.dist)
        train, num_classes = self.data.train, len(self.data.classes)
        labels = train.labels.to(self.device)
        with torch.no_grad():
            if not self.dist.enabled:
                self.kernel.set_centres(self.embedder.embed(train.images), labels, num_classes)
                return time.perf_counter() - t0
            part = self.dist.shard(len(train))
            centres = dist_utils.all_gather_rows(self.embedder.embed(train.images[part]), self.dist)
            self.kernel.set_centres(centres, labels, num_classes, train_neighbours=False)
            own = torch.arange(part.start, part.stop, device=centres.device)
            local = knn_search(centres[part], centres, self.kernel.k, exclude=own, backend=self.kernel.search_backend).indices
            self.kernel.set_training_neighbours(dist_utils.all_gather_rows(local, self.dist))
        return time.perf_counter() - t0

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        """The validation and test metrics after ``epoch`` (the centres just refreshed);
        keeps the best-on-validation model. Retrieval metrics (MAP@R, NMI: k-means) cost
        more than the rest: final model only."""
        t0 = time.perf_counter()
        val, _ = self.evaluate_split(self.data.val, retrieval=False)
        test, test_emb = self.evaluate_split(self.data.test, retrieval=self.cfg.retrieval_metrics and last)
        if self.cfg.tsne_graph and len(self.data.test):
            self.tsne.keep(epoch + 1, test_emb, self.data.test.labels)
        row: dict[str, Any] = {f"val_{k}": v for k, v in val.items()}
        row.update({f"test_{k}": v for k, v in test.items()})
        row["val_acc"] = val.get("nngk_acc")
        row["test_acc"] = test.get("nngk_acc")
        row["eval_s"] = time.perf_counter() - t0
        best = update_best(self.state.best, row | {"epoch": epoch + 1})
        if row["val_acc"] is not None and best.get("val_epoch") == epoch + 1 and self.dist.is_main:
            self.folder.save_best_model(self.model_state(epoch + 1))
        self.state.best = best
        return row

    def evaluate_split(self, images_set: Any, retrieval: bool) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Metrics of one split and its embeddings. With several processes each embeds its
        shard, the embeddings are gathered once and rank 0's metrics are shared with the others."""
        if len(images_set) == 0:
            return {}, None
        if not self.dist.enabled:
            emb = self.embedder.embed(images_set.images)
        else:
            emb = dist_utils.all_gather_rows(self.embedder.embed(images_set.images[self.dist.shard(len(images_set))]), self.dist)
        metrics = None
        if self.dist.is_main:
            metrics = evaluate_embeddings(self.kernel, emb, images_set.labels.to(self.device), knn_k=self.cfg.knn_k, retrieval=retrieval, seed=self.cfg.seed)
        return dist_utils.broadcast_object(metrics, self.dist), emb

    # -------------------------------------------------------------- the steps
    def train_epoch(self, epoch: int, total_steps: int) -> dict[str, Any]:
        """One pass over the labelled images; returns the epoch's mean loss and its parts,
        the training accuracy and the last learning rate."""
        cfg = self.cfg
        loader = self.loader()
        self.model.train()
        self.method.train()
        if cfg.freeze_bn:
            set_batchnorm_eval(self.model)
        self.algorithm.start_epoch(self, epoch)
        sums: dict[str, torch.Tensor | float] = {}
        correct: torch.Tensor | int = 0
        seen = 0
        steps = len(loader)
        lr = cfg.learning_rate
        bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{cfg.max_epochs}", enabled=cfg.progress and self.dist.is_main, leave=False)
        for i, batch in enumerate(bar):
            lr = learning_rate_at(cfg, epoch * steps + i, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            extra = self.algorithm.step_inputs(self, batch, epoch)
            with self.autocast():
                out = self.step(batch.images, batch.labels, batch.indices, self.mix_gen, **extra)
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
        counts = {f"_algorithm_{k}": float(v) for k, v in self.algorithm.epoch_counts().items()}
        totals = dist_utils.sum_scalars({k: float(v) for k, v in sums.items()} | {"_correct": float(correct), "_seen": float(seen)} | counts, self.dist)
        correct, seen = totals.pop("_correct"), totals.pop("_seen")
        counts = {k[len("_algorithm_"):]: totals.pop(k) for k in counts}
        row: dict[str, Any] = {k: v / max(1, steps * self.dist.world_size) for k, v in totals.items()}
        row.update(self.algorithm.epoch_row(counts))
        row["train_acc"] = correct / seen if seen else None
        row["lr"] = lr
        return row

    def autocast(self) -> torch.autocast:
        """The run's autocast (``--amp bf16``): the steps, the centres and every embedding
        run in the same precision (the kernel classifier itself stays in float32)."""
        return self.embedder.autocast()

    # ------------------------------------------------------------- the state
    def model_state(self, epoch: int) -> dict[str, Any]:
        """The model after ``epoch`` (best.pt): the network, the method (kernel weights and
        centres, the mixup head), the class names and the configuration."""
        return {"format": "mbdml-model-1", "epoch": epoch, "model": self.model.state_dict(), "method": self.method.state_dict(),
                "classes": list(self.data.classes), "image_shape": self.image_shape(), "config": self.cfg.to_dict()}

    def seconds(self) -> float:
        """The run's time so far, the time before a resume included."""
        return self.state.seconds_before + time.perf_counter() - self.started

    def image_shape(self) -> list[int]:
        """(C, H, W) of the images the network was trained on (saved with it)."""
        return list(self.data.train.images.shape[1:])

    def checkpoint_state(self) -> dict[str, Any]:
        """The whole state after the last finished epoch (last.pt); a collective with several processes."""
        return {
            "format": "mbdml-run-1",
            "epoch": self.state.epoch,  # epochs completed
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
            "history": self.state.history,
            "best": self.state.best,
            "centres_fresh": self.state.centres_fresh,
            "seconds": self.seconds(),
            **self.algorithm.state_dict(),
            "classes": list(self.data.classes),
            "image_shape": self.image_shape(),
            "config": self.cfg.to_dict(),
        }

    def restore(self) -> None:
        """Read the state of the run folder's last.pt back (see :meth:`checkpoint_state`)."""
        path = self.run_dir / "last.pt"
        state = load_checkpoint(path, map_location=self.device)
        check_resume_state(state, path, more=self.algorithm.state_rules())
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
            self.build_optimizer()
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
            raise CheckpointError(f"{path} does not match this run's configuration ({exc}); start a new run instead of --resume") from None
        self.state = TrainingState(
            int(state["epoch"]), list(state["history"]), dict(state["best"]), bool(state.get("centres_fresh", False)),
            float(state.get("seconds", 0.0)),
        )
        self.algorithm.load_state_dict(state, self.device)

    # ------------------------------------------------------------ the others
    def _join_job(self) -> None:
        """Per-process device, logging and the run folder chosen by rank 0."""
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:
            log.setLevel(logging.WARNING)
        self.run_dir = Path(dist_utils.broadcast_object(str(self.run_dir), self.dist))
        self.folder = RunFolder(self.run_dir)
        if self.cfg.centre_momentum is not None:
            raise ConfigError("--centre_momentum (a memory bank of centres) is not supported with several processes yet; drop it, or train with one process")
        if self.cfg.teacher_epochs is not None:
            raise ConfigError(
                "--teacher_epochs (the teacher trained in the same run) is not supported with several processes yet: train "
                "the teacher as a run of its own, then the student with --teacher FOLDER"
            )
        if self.cfg.sync_bn and self.device.type != "cuda":
            raise ConfigError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm); on CPUs each process keeps its own BatchNorm batch statistics")

    def _plot(self) -> None:
        """The accuracy curves, and the t-SNE maps with ``--tsne_graph``."""
        try:
            self.folder.plot_curves(self.state.history, title=f"{self.cfg.method} on {self.cfg.dataset}")
            if self.cfg.tsne_graph:
                train, test = self.data.train, self.data.test
                self.folder.plot_tsne(
                    (self.embedder.embed(train.images).cpu(), train.labels), (self.embedder.embed(test.images).cpu(), test.labels),
                    self.tsne.frames, self.data.classes, self.cfg.seed,
                )
        except Exception as exc:  # a plot must never lose a finished run
            log.warning("could not draw the plots (%s); the metrics are in %s", exc, self.run_dir / "metrics.csv")


def recalibration_rows(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """The training images whose BatchNorm statistics are re-estimated: all (None) when
    ``limit`` is None or not below ``n``, else a fixed random subset of ``limit`` rows,
    ascending, drawn from ``seed`` (the same at every refresh and after a resume)."""
    if limit is None or limit >= n:
        return None
    gen = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n, generator=gen)[:limit].sort().values
