"""The network, kernel classifier and method a configuration asks for, new or read back
from a run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_model_state, load_checkpoint
from .config import RunConfig
from .errors import CheckpointError
from .kernel import NNGKClassifier
from .methods import Method, build_method
from .models import EmbeddingNet, build_model


def build_components(cfg: RunConfig, in_channels: int, num_classes: int, pretrained: str | bool | None = None) -> tuple[EmbeddingNet, NNGKClassifier, Method]:
    """The embedding model, the kernel classifier and the method a configuration asks for."""
    model = build_model(cfg.model, in_channels=in_channels, embedding_dim=cfg.embedding_dim, pretrained=pretrained, width=cfg.width, normalize=cfg.normalize_embeddings, freeze_stages=cfg.freeze_stages)
    kernel = NNGKClassifier(
        num_classes=num_classes, sigma=cfg.sigma, k=cfg.k, class_floor=cfg.class_floor, learn_weights=cfg.learn_kernel_weights, search_backend=cfg.search
    )
    method = build_method(cfg.method, kernel, model.embedding_dim, num_classes, cfg.method_options())
    return model, kernel, method


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
    """Rebuild the model and kernel of a saved run (``which``: best or last checkpoint),
    in eval mode and in the memory format it trained in (channels-last or not), so that
    it computes the embeddings it computed then."""
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
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
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
