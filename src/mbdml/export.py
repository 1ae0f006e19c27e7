"""A trained run as one self-contained file: uint8 images in, class probabilities out.

    mbdml export runs/mbdml2-digits-seed0-run0 --out model.pt2

:func:`export_run` puts the network, the normalisation, the flip averaging of
``--tta_flip`` runs, the centres, their labels and kernel weights, and the kernel
classifier (the K nearest centres, the class floor, the normalisation) into one
``torch.export`` program. It needs nothing but PyTorch to run::

    import torch
    program = torch.export.load("model.pt2")
    probabilities = program.module()(images)      # images: uint8 (B, C, H, W)

The class names and the input size travel in the same file (``extra_files``:
``mbdml.json``), read with :func:`read_export_info` or
``torch.export.load(path, extra_files={"mbdml.json": ""})``.

The program computes in float32 (a run trained with ``--amp bf16`` embedded its
centres in bfloat16 autocast; its exported probabilities can differ from that run's
own figures in the last digits), and takes images already at the run's input size:
resize them the way the run's data were (``mbdml predict`` does it for you).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError

EXPORT_INFO = "mbdml.json"


class StandaloneClassifier(nn.Module):
    """The network and the kernel classifier of a run as plain tensor operations.

    forward(images): uint8 ``(B, C, H, W)`` at the run's size -> ``(B, num_classes)``
    probabilities under the K nearest centres, exactly the kernel classifier's
    test-time rule (``NNGKClassifier.predict_log_proba``) with the run's class floor.
    """

    def __init__(
        self,
        model: nn.Module,
        centres: torch.Tensor,
        centre_labels: torch.Tensor,
        log_weights: torch.Tensor,
        *,
        num_classes: int,
        sigma: float,
        k: int,
        class_floor: str,
        min_prob: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        flip_average: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("centres", centres.detach().float().clone())
        self.register_buffer("centre_sq", self.centres.pow(2).sum(1))
        self.register_buffer("centre_labels", centre_labels.detach().long().clone())
        self.register_buffer("log_weights", log_weights.detach().float().clone())
        self.num_classes = int(num_classes)
        self.inv = 1.0 / (2.0 * float(sigma) ** 2)
        self.k = min(int(k), int(centres.shape[0]))
        self.authors_floor = class_floor == "authors"
        self.log_min_prob = math.log(min_prob)
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1))
        self.flip_average = bool(flip_average)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * self.scale + self.shift
        f = self.model(x).float()
        if self.flip_average:
            f = 0.5 * (f + self.model(x.flip(3)).float())
        return f

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.embed(images)
        # log k_j(f) for every centre, then the K largest (the K nearest, weights aside:
        # the neighbours are chosen by distance alone, as the kernel classifier does)
        dots = f @ self.centres.t()
        sq = (f * f).sum(1, keepdim=True)
        dist = (sq + self.centre_sq.unsqueeze(0) - 2.0 * dots).clamp_min(0.0)
        near = torch.topk(dist, self.k, dim=1, largest=False).indices
        logits = self.log_weights[near] - dist.gather(1, near) * self.inv
        if not self.authors_floor:  # the per-row shift cancels when normalising over present classes
            logits = logits + sq * self.inv
        labels = self.centre_labels[near]
        class_max = torch.full((f.shape[0], self.num_classes), float("-inf"), dtype=logits.dtype, device=logits.device)
        class_max = class_max.scatter_reduce(1, labels, logits, reduce="amax", include_self=True)
        present = class_max > float("-inf")
        shift = torch.where(present, class_max, torch.zeros_like(class_max))
        e = (logits - shift.gather(1, labels)).exp()
        mass = torch.zeros_like(class_max).scatter_add(1, labels, e)
        class_lse = mass.clamp_min(torch.finfo(mass.dtype).tiny).log() + shift
        floor = torch.full_like(class_lse, self.log_min_prob)
        if self.authors_floor:
            r = torch.where(present, class_lse, floor)
        else:
            masked = torch.where(present, class_lse, torch.full_like(class_lse, float("-inf")))
            r = torch.where(present, masked - torch.logsumexp(masked, dim=1, keepdim=True), floor)
        return torch.softmax(r, dim=1)


def standalone_classifier(loaded: Any) -> StandaloneClassifier:
    """The :class:`StandaloneClassifier` of a run loaded with ``mbdml.components.load_run``."""
    cfg, kernel = loaded.config, loaded.kernel
    return StandaloneClassifier(
        loaded.model,
        kernel.centres,
        kernel.centre_labels,
        kernel.log_weights,
        num_classes=int(kernel.num_classes),
        sigma=kernel.sigma,
        k=kernel.k,
        class_floor=kernel.class_floor,
        min_prob=kernel.min_prob,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        flip_average=bool(cfg.tta_flip),
    ).eval()


def export_classifier(classifier: StandaloneClassifier, example: torch.Tensor, out: str | Path, info: dict[str, Any]) -> Path:
    """Trace ``classifier`` on ``example`` (uint8, batch of at least 2) with a free batch
    size and save the program, with ``info`` as ``mbdml.json``, to ``out``."""
    out = Path(out)
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"cannot write {out}: {blocking} is a file, not a folder; give another --out path")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.export.export(classifier, (example,), dynamic_shapes={"images": {0: batch}})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.export.save(program, str(tmp), extra_files={EXPORT_INFO: json.dumps(info, sort_keys=True)})
        tmp.replace(out)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"cannot write {out} ({e}); free disk space or give another --out path") from None
    return out


def read_export_info(path: str | Path) -> dict[str, Any]:
    """The class names, input size and run details saved beside an exported program."""
    files = {EXPORT_INFO: ""}
    try:
        torch.export.load(str(path), extra_files=files)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a program written by 'mbdml export' ({str(e).splitlines()[0]})") from None
    return json.loads(files[EXPORT_INFO] or "{}")


def export_run(run_dir: str | Path, out: str | Path, which: str = "best", image_size: int | None = None) -> Path:
    """Export a finished run's model and kernel classifier to ``out`` (see the module docstring).

    ``image_size`` is needed only for runs saved before mbdml recorded the size of
    their images (and trained at the data's own size).
    """
    from .components import load_run

    loaded = load_run(run_dir, which=which)
    shape = loaded.image_shape
    if shape is None:
        if image_size is None:
            raise ConfigError(
                f"{run_dir} was saved before mbdml recorded the size of its images; pass --image_size N "
                "(the side in pixels of the images it trained on)"
            )
        shape = (_model_channels(loaded.model), image_size, image_size)
    classifier = standalone_classifier(loaded)
    example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    info = {
        "classes": loaded.classes or [str(c) for c in range(int(loaded.kernel.num_classes))],
        "image_shape": list(shape),
        "method": loaded.config.method,
        "dataset": loaded.config.dataset,
        "checkpoint": which,
        "epoch": loaded.epoch,
    }
    return export_classifier(classifier, example, out, info)


def _model_channels(model: nn.Module) -> int:
    for p in model.parameters():
        if p.dim() == 4:  # the first convolution's weight
            return int(p.shape[1])
    raise CheckpointError("the model holds no convolution; it was not written by mbdml")
