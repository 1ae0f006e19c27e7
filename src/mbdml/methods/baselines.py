"""The paper's baselines: pytorch-metric-learning losses on the embeddings.

Contrastive, ProxyAnchor, SoftTriple, SupCon and Triplet (margin), trained on the same
backbone as the MbDML methods and evaluated with the same (untrained-weight) kernel
classifier and k-NN. pytorch-metric-learning is imported when a baseline is built.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import LossOutput, Method


class MetricLearningBaseline(Method):
    """A pytorch-metric-learning loss on the embeddings (the paper's baselines)."""

    def __init__(self, kernel, embedding_dim, num_classes, options=None):
        super().__init__(kernel, embedding_dim, num_classes, options)
        self.loss_fn = self.make_loss(embedding_dim, num_classes)

    def make_loss(self, embedding_dim: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, model, images, labels, indices, generator=None):
        f = model(images)
        loss = self.loss_fn(f, labels)
        return LossOutput(loss, {self.name: loss.detach()})


def _pml_losses():
    try:
        from pytorch_metric_learning import losses
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("the baseline losses need pytorch-metric-learning: pip install pytorch-metric-learning") from exc
    return losses


class ContrastiveBaseline(MetricLearningBaseline):
    name = "contrastive"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)


class ProxyAnchorBaseline(MetricLearningBaseline):
    name = "proxyanchor"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().ProxyAnchorLoss(num_classes, embedding_dim, margin=0.1, alpha=32)


class SoftTripleBaseline(MetricLearningBaseline):
    name = "softtriple"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().SoftTripleLoss(num_classes, embedding_dim, centers_per_class=10, la=20, gamma=0.1, margin=0.01)


class SupConBaseline(MetricLearningBaseline):
    name = "supcon"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().SupConLoss(temperature=0.1)


class TripletBaseline(MetricLearningBaseline):
    name = "triplet"

    def make_loss(self, embedding_dim, num_classes):
        return _pml_losses().TripletMarginLoss(margin=0.1)
