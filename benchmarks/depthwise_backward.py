"""The depthwise convolutions' backward pass: PyTorch's CPU kernels against ours.

Two parts, each timed side by side in one run (interleaved rounds, median of each):

1. each depthwise convolution of EfficientNet-Lite0's trainable stages (the ``finetune``
   preset: stages 4-7 at 128 pixels), its input and weight gradients in bfloat16, by
   PyTorch (``aten.convolution_backward``) and by :mod:`mbdml.models.depthwise`;
2. a whole training step of the trainable part (forward and backward of stages 4-7 and
   the embedding, bfloat16 autocast, channels-last), with PyTorch's depthwise backward
   and with ours;
3. the frozen stages' forward pass (what every training step and the first labelling of
   the unlabelled images run), with a separate BatchNorm after each convolution and with
   the BatchNorm folded into the convolutions.

    python benchmarks/depthwise_backward.py [--size 128 --freeze 3 --batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import mbdml.models.efficientnet as efficientnet
from mbdml.models import build_model
from mbdml.models.depthwise import depthwise_grad_input, depthwise_grad_weight


def _median_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _layer_shapes(model: torch.nn.Module, size: int, freeze: int) -> list[tuple[int, int, int, int, int]]:
    """(channels, input side, kernel, stride, padding) of each trainable depthwise convolution."""
    shapes: list[tuple[int, int, int, int, int]] = []
    hooks = []
    for m in model.modules():
        if isinstance(m, efficientnet.SameConv2d) and m.is_depthwise and m.weight.requires_grad:
            def hook(mod, inp, out):  # noqa: ANN001
                x = inp[0]
                side = x.shape[-1]
                if mod.dynamic_padding:  # TensorFlow "SAME": the padding is added before the convolution
                    out_side = -(-side // mod.stride[0])
                    side = side + max((out_side - 1) * mod.stride[0] + mod.kernel_size[0] - side, 0)
                shapes.append((x.shape[1], side, mod.kernel_size[0], mod.stride[0], mod.padding[0]))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image side (default 128, the finetune preset)")
    p.add_argument("--freeze", type=int, default=3, help="frozen stages (default 3, the finetune preset)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 3, embedding_dim=128, normalize=True, freeze_stages=args.freeze)
    model = model.to(memory_format=torch.channels_last).train()

    print(f"## Depthwise layers of the trainable stages, bfloat16, batch {args.batch}, {args.size} px\n")
    print("| channels | side | kernel | stride | input grad: PyTorch ms | ours ms | weight grad: PyTorch ms | ours ms |")
    print("|---|---|---|---|---|---|---|---|")
    total_theirs = total_ours = 0.0
    for c, side, k, s, pad in _layer_shapes(model, args.size, args.freeze):
        x = torch.randn(args.batch, c, side, side, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, 1, k, k, dtype=torch.bfloat16)
        g = torch.randn_like(F.conv2d(x, w, None, s, pad, 1, c))

        def aten(mask: list[bool]):
            return lambda: torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], c, mask)

        ms = _median_ms(
            {
                "their_x": aten([True, False, False]),
                "our_x": lambda: depthwise_grad_input(g, w, s, pad, (side, side)),
                "their_w": aten([False, True, False]),
                "our_w": lambda: depthwise_grad_weight(g, x, s, pad, k),
            },
            args.rounds,
        )
        total_theirs += ms["their_x"] + ms["their_w"]
        # what the layer's backward uses: PyTorch's kernel where it is fast (see depthwise.py)
        total_ours += (ms["their_x"] if s == 1 else ms["our_x"]) + (ms["their_w"] if k <= 3 else ms["our_w"])
        print(f"| {c} | {side} | {k} | {s} | {ms['their_x']:.2f} | {ms['our_x']:.2f} | {ms['their_w']:.2f} | {ms['our_w']:.2f} |")
    print(f"\nAll depthwise gradients of one step: PyTorch {total_theirs:.1f} ms, ours {total_ours:.1f} ms "
          f"({total_theirs / total_ours:.1f}x)\n")

    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.frozen_features(x)
    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.embed_frozen_features(h).float().square().sum()
        loss.backward()

    def frozen_forward() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.frozen_features(x)

    pytorch_depthwise = {"depthwise_conv2d": lambda x, w, s, p, b=None: F.conv2d(x, w, b, s, p, 1, w.shape[0])}
    separate_batchnorm = {"conv_bn": lambda conv, bn, x: bn(conv(x))}
    _side_by_side(
        f"A training step of the trainable part (stages {args.freeze + 1}-7 and the embedding), bfloat16",
        "depthwise backward", "ms per step", {"pytorch": (train_step, pytorch_depthwise), "ours": (train_step, {})},
        args,
    )
    _side_by_side(
        f"The frozen stem and stages 1-{args.freeze}, forward, bfloat16",
        "BatchNorm", "ms per batch", {"separate": (frozen_forward, separate_batchnorm), "folded": (frozen_forward, {})},
        args,
    )


def _side_by_side(title: str, what: str, unit: str, variants: dict, args: argparse.Namespace) -> None:
    """Time each (function, replaced efficientnet attributes) variant and print a table, the first as 1.00x."""

    def patched(fn: Callable[[], None], replace: dict[str, object]) -> Callable[[], None]:
        def run() -> None:
            saved = {k: getattr(efficientnet, k) for k in replace}
            for k, v in replace.items():
                setattr(efficientnet, k, v)
            try:
                fn()
            finally:
                for k, v in saved.items():
                    setattr(efficientnet, k, v)
        return run

    ms = _median_ms({name: patched(fn, rep) for name, (fn, rep) in variants.items()}, args.rounds)
    base = ms[next(iter(variants))]
    print(f"\n## {title}\n")
    print(f"| {what} | {unit} | images/s | ratio |")
    print("|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {ms[name]:.0f} | {args.batch / ms[name] * 1000:.0f} | {base / ms[name]:.2f}x |")

if __name__ == "__main__":
    main()
