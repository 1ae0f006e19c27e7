"""Embedding networks: trunks (ResNets, EfficientNet-Lite0) and the embedding wrapper."""

from mbdml.models.efficientnet import EfficientNetLite, efficientnet_lite0, lite0_checkpoint_path
from mbdml.models.embedding import MODEL_NAMES, EmbeddingNet, build_model, recalibrate_batchnorm, set_batchnorm_eval
from mbdml.models.resnet import (
    ResNet,
    SmallResNet,
    describe_state_dict,
    load_pretrained,
    resnet18,
    resnet50,
)

__all__ = [
    "MODEL_NAMES",
    "EmbeddingNet",
    "EfficientNetLite",
    "ResNet",
    "SmallResNet",
    "build_model",
    "describe_state_dict",
    "efficientnet_lite0",
    "lite0_checkpoint_path",
    "load_pretrained",
    "resnet18",
    "resnet50",
    "recalibrate_batchnorm",
    "set_batchnorm_eval",
]
