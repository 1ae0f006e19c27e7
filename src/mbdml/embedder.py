"""Embedding un-augmented images with a trained (or training) network: one way, used by
the centre refresh, evaluation, pseudo-labelling, the self-training teacher, and the
``mbdml evaluate`` and ``mbdml embed`` commands, so that they all see the same embeddings.

An embedding is computed with the network in eval mode, without gradient, under the
run's autocast (``--amp bf16``), on normalised inputs in the run's memory format
(channels-last), and, with ``--tta_flip``, as the mean of the image's and its mirror
image's embeddings. With frozen stages (``--freeze_stages``) the stages' outputs are
kept in a :class:`~mbdml.feature_cache.FrozenFeatureCache` and only the trainable part
runs again.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .config import RunConfig
from .data.batches import normalize_batch
from .evaluate import compute_embeddings
from .feature_cache import FrozenFeatureCache
from .models import EmbeddingNet


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every module's own mode back after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Embedder:
    """Embeddings (N, D), float32, of uint8 images (N, C, H, W) with ``model``.

    ``flip_average``: the mean with the mirror image's embedding. ``amp``: "bf16" for a
    bfloat16 autocast (the kernel classifier stays in float32), "none" for float32.
    ``cache``: the frozen stages' outputs, kept (None: none kept).
    """

    def __init__(
        self,
        model: EmbeddingNet,
        *,
        device: torch.device,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
        channels_last: bool = False,
        flip_average: bool = False,
        amp: str = "none",
        batch_size: int = 256,
        cache: FrozenFeatureCache | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device(device)
        self.mean, self.std = mean, std
        self.channels_last = channels_last
        self.flip_average = flip_average
        self.amp = amp
        self.batch_size = batch_size
        self.cache = cache

    @classmethod
    def for_run(cls, model: EmbeddingNet, cfg: RunConfig, device: torch.device, *, amp: str | None = None,
                cache: FrozenFeatureCache | None = None) -> "Embedder":
        """The embedder of a run configured by ``cfg`` (batches of at least 256 images;
        ``amp``, when given, instead of the run's own)."""
        return cls(
            model, device=device, mean=cfg.mean, std=cfg.std, channels_last=cfg.channels_last, flip_average=cfg.tta_flip,
            amp=cfg.amp if amp is None else amp, batch_size=max(256, cfg.batch_size), cache=cache,
        )

    def autocast(self) -> torch.autocast:
        """The run's bfloat16 autocast (``amp`` "bf16"), or a disabled one."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16")

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``images``: through the kept frozen-stage features when they
        are (or can be) kept for this tensor, else the whole network."""
        with eval_mode(self.model), self.autocast():
            kept = self.kept_embeddings(images)
            if kept is not None:
                return kept
            return compute_embeddings(
                self.model, images, batch_size=self.batch_size, device=self.device, mean=self.mean, std=self.std,
                channels_last=self.channels_last, flip_average=self.flip_average,
            )

    @torch.no_grad()
    def kept_embeddings(self, images: torch.Tensor) -> torch.Tensor | None:
        """The embeddings of ``images`` through the frozen-stage cache, or None when it
        does not (and cannot) keep their features."""
        if self.cache is None:
            return None
        with eval_mode(self.model), self.autocast():
            return self.cache.embed(images, flip_average=self.flip_average)

    @torch.no_grad()
    def embed_rows(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``images[rows]`` in one pass, without flip averaging (the
        weak view of online pseudo-labelling): the frozen-stage features of the whole set
        are kept when they can be, and only the rows' go through the rest."""
        with eval_mode(self.model), self.autocast():
            kept = self.cache.features(images) if self.cache is not None else None
            if kept is not None:
                return self.model.embed_frozen_features(kept[rows.to(kept.device)]).float()
            x = normalize_batch(images.index_select(0, rows).to(self.device), self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float()
