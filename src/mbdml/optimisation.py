"""The optimiser of a run and its learning-rate schedule.

The schedule is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

from .config import RunConfig


def learning_rate_at(cfg: RunConfig, step: int, total_steps: int) -> float:
    """The learning rate of ``step`` of ``total_steps``: ``cfg.learning_rate`` under ``cfg.schedule``
    (none, cosine, or one-cycle: a linear warm-up over the first quarter, then a linear decay)."""
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


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params``: SGD (Nesterov when momentum > 0), AdamW or Adam."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
