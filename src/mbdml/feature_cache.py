"""Keep the frozen stages' outputs of un-augmented images: computed once per run.

With ``freeze_stages`` the stem and the first stages of a pretrained trunk never change
while training. For an image seen without augmentation (a centre, a validation or test
image, an unlabelled image being pseudo-labelled, a BatchNorm recalibration batch) their
output is therefore the same at every refresh. Kept after the first pass, each later
pass runs only the trainable part of the network: the early, high-resolution layers are
where most of a forward pass's time goes.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from .data.batches import normalized_batches
from .models.embedding import EmbeddingNet

__all__ = ["FrozenFeatureCache", "same_frozen_stages"]


@torch.no_grad()
def same_frozen_stages(a: EmbeddingNet, b: EmbeddingNet) -> bool:
    """Whether two models' frozen stems and stages compute the same function: the same
    number of frozen stages and equal weights and BatchNorm statistics in them (both
    start from the same pretrained weights, which freezing keeps). Then the frozen
    features one has computed are the other's too."""
    if a.frozen_stages != b.frozen_stages or a.frozen_stages == 0 or len(a.frozen_modules) != len(b.frozen_modules):
        return False
    for ma, mb in zip(a.frozen_modules, b.frozen_modules):
        sa, sb = ma.state_dict(), mb.state_dict()
        if sa.keys() != sb.keys():
            return False
        for key, value in sa.items():
            other = sb[key]
            if value.shape != other.shape or not torch.equal(value.cpu(), other.cpu()):
                return False
    return True


@dataclass
class _Entry:
    images: torch.Tensor  # pins the source tensor, so its address is not reused while kept
    plain: torch.Tensor | None = None
    flipped: torch.Tensor | None = None


class FrozenFeatureCache:
    """The outputs of ``model``'s frozen stages for fixed image tensors, kept in memory.

    A set of images is identified by its tensor (storage, offset, shape, stride): pass
    the same tensor, or the same slice of it, at every refresh. Nothing is kept beyond
    ``max_bytes``: a set that does not fit is left to the caller (the methods return
    None), which embeds it the plain way. The caller chooses the precision: features are
    kept as the frozen stages return them (bfloat16 under a bfloat16 autocast). Call
    :meth:`clear` after changing the frozen weights.
    """

    def __init__(
        self,
        model: EmbeddingNet,
        *,
        max_bytes: int,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
        channels_last: bool = False,
    ) -> None:
        self.model = model
        self.max_bytes = int(max_bytes)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.mean, self.std = mean, std
        self.channels_last = channels_last
        self.used_bytes = 0
        self._entries: dict[tuple, _Entry] = {}
        self._refused: set[tuple] = set()
        self._frozen_stages = model.frozen_stages

    @property
    def enabled(self) -> bool:
        """Whether the model has frozen stages it can run apart, and there is room to keep them."""
        return self.max_bytes > 0 and self.model.splits_at_frozen_stages

    def clear(self) -> None:
        """Forget everything kept (after the frozen weights or the number of frozen stages changed)."""
        self._entries.clear()
        self._refused.clear()
        self.used_bytes = 0
        self._frozen_stages = self.model.frozen_stages

    @staticmethod
    def _key(images: torch.Tensor) -> tuple:
        return (
            images.device.type,
            images.untyped_storage().data_ptr(),
            images.storage_offset(),
            tuple(images.shape),
            tuple(images.stride()),
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor, flipped: bool = False) -> torch.Tensor | None:
        """The frozen stages' output for uint8 ``images`` (N, C, H, W), or their mirror images.

        Computed on the first call for this tensor and kept; None when the cache is off or
        the set does not fit in ``max_bytes`` (then nothing is kept for it).
        """
        if not self.enabled or images.shape[0] == 0:
            return None
        if self.model.frozen_stages != self._frozen_stages:
            self.clear()
        key = self._key(images)
        if key in self._refused:
            return None
        entry = self._entries.get(key)
        kept = None if entry is None else (entry.flipped if flipped else entry.plain)
        if kept is not None:
            return kept
        parts: list[torch.Tensor] = []
        inputs = normalized_batches(
            images, self.batch_size, device=self.device, mean=self.mean, std=self.std, channels_last=self.channels_last, flipped=flipped
        )
        for x in inputs:
            h = self.model.frozen_features(x)
            if not parts:  # the first batch tells the size of the whole set
                need = h[:1].element_size() * h[:1].numel() * images.shape[0]
                if self.used_bytes + need > self.max_bytes:
                    self._refused.add(key)
                    return None
            parts.append(h)
        out = torch.cat(parts)
        self.used_bytes += out.element_size() * out.numel()
        if entry is None:
            entry = self._entries[key] = _Entry(images)
        if flipped:
            entry.flipped = out
        else:
            entry.plain = out
        return out

    def peek(self, images: torch.Tensor, flipped: bool = False) -> torch.Tensor | None:
        """The kept features of ``images`` (or of their mirror images), without computing them."""
        if self.model.frozen_stages != self._frozen_stages:
            return None
        entry = self._entries.get(self._key(images))
        return None if entry is None else (entry.flipped if flipped else entry.plain)

    def put(self, images: torch.Tensor, plain: torch.Tensor, flipped: torch.Tensor | None = None) -> bool:
        """Keep features computed elsewhere for ``images`` (by a model with the same frozen
        stages, see :func:`same_frozen_stages`); False, keeping nothing, when they do not
        fit in ``max_bytes`` or do not match the images."""
        if not self.enabled or plain.shape[0] != images.shape[0] or (flipped is not None and flipped.shape != plain.shape):
            return False
        if self.model.frozen_stages != self._frozen_stages:
            self.clear()
        key = self._key(images)
        old = self._entries.get(key)
        freed = sum(t.element_size() * t.numel() for t in (old.plain, old.flipped) if t is not None) if old else 0
        need = sum(t.element_size() * t.numel() for t in (plain, flipped) if t is not None)
        if self.used_bytes - freed + need > self.max_bytes:
            return False
        self._entries[key] = _Entry(images, plain, flipped)
        self._refused.discard(key)
        self.used_bytes += need - freed
        return True

    @torch.no_grad()
    def embed(self, images: torch.Tensor, *, flip_average: bool = False) -> torch.Tensor | None:
        """Embeddings (N, D), float32, as :func:`mbdml.evaluate.compute_embeddings` gives them,
        through the kept features; None when they are not (and cannot be) kept.

        The caller puts the model in eval mode (and sets the autocast, as for the plain way).
        """
        plain = self.features(images)
        flipped = self.features(images, flipped=True) if flip_average else None
        if plain is None or (flip_average and flipped is None):
            return None
        out = []
        for i in range(0, plain.shape[0], self.batch_size):
            f = self.model.embed_frozen_features(plain[i : i + self.batch_size]).float()
            if flipped is not None:
                f = 0.5 * (f + self.model.embed_frozen_features(flipped[i : i + self.batch_size]).float())
            out.append(f)
        return torch.cat(out)

    def feature_batches(self, images: torch.Tensor, rows: torch.Tensor | None = None) -> list[torch.Tensor] | None:
        """The kept features of ``images`` (of only its ``rows``, in their order, when given)
        in batches of ``batch_size``, or None."""
        plain = self.features(images)
        if plain is None:
            return None
        if rows is not None:
            plain = plain[rows.to(plain.device)]
        return [plain[i : i + self.batch_size] for i in range(0, plain.shape[0], self.batch_size)]
