"""One training step of each method against plain cross-entropy on the same backbone.

Everything is timed side by side in one run (interleaved rounds, median of each), so
the printed ratios hold on a noisy machine even when the absolute times do not:

- MbDML2, NNGK, Mixup: one forward/backward pass, against one plain CE step;
- MbDML1, MbDML3: a clean and a mixed pass, against plain CE on both (a 2B batch);
- the input pipeline: images per second that the batch loader (flip + padded crop +
  normalisation on whole batches) delivers, against what a CE training step consumes;
  and the same with RandAugment and Cutout on top (the strong view that
  ``--pseudo_augment randaugment`` gives the pseudo-labelled images).

    python benchmarks/step_speed.py [--batch 128 --width 32 --centres 4500 --device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mbdml.data.batches import Augmentation, BatchLoader, augment_batch
from mbdml.data.randaugment import RandAugment, randaugment_batch
from mbdml.kernel import NNGKClassifier
from mbdml.methods import MethodOptions, build_method
from mbdml.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--centres", type=int, default=4500)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline measurement")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    b, n = args.batch, args.centres
    model = build_model("resnet_small", in_channels=3, embedding_dim=128, width=args.width, normalize=True).to(device, memory_format=torch.channels_last)
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    x = torch.randn(b, 3, args.size, args.size).to(device).contiguous(memory_format=torch.channels_last)
    y = labels[:b].to(device)
    idx = torch.arange(b, device=device)
    kernel = NNGKClassifier(num_classes=10, sigma=0.3, k=args.k).to(device)
    with torch.no_grad():
        kernel.set_centres(torch.nn.functional.normalize(torch.randn(n, 128), dim=1).to(device), labels.to(device))
    head = torch.nn.Linear(128, 10).to(device)
    methods = {name: build_method(name, kernel, 128, 10, MethodOptions()).to(device) for name in ("nngk", "mixup", "mbdml1", "mbdml2", "mbdml3")}
    params = list(model.parameters()) + list(head.parameters()) + [q for m in methods.values() for q in m.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x2 = torch.cat([x, x])
    y2 = torch.cat([y, y])

    def ce(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(model(inputs)), targets).backward()
        opt.step()

    def method_step(name: str) -> None:
        opt.zero_grad(set_to_none=True)
        methods[name](model, x, y, idx, gen).loss.backward()
        opt.step()

    steps = {
        "ce (B)": lambda: ce(x, y),
        "ce (2B)": lambda: ce(x2, y2),
        **{name: (lambda name=name: method_step(name)) for name in methods},
    }
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.train()
    for fn in steps.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for key, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}"
    print(f"one training step, batch {b}, {args.size}x{args.size}, resnet_small width {args.width}, {n} centres, K {args.k}, {where} (median of {args.rounds} interleaved rounds)")
    print("| step | median s | images/s | ratio | against |")
    print("|---|---|---|---|---|")
    for key, ref in (("ce (B)", "ce (B)"), ("ce (2B)", "ce (B)"), ("nngk", "ce (B)"), ("mixup", "ce (B)"), ("mbdml2", "ce (B)"), ("mbdml1", "ce (2B)"), ("mbdml3", "ce (2B)")):
        print(f"| {key} | {med[key]:.4f} | {b / med[key]:.0f} | {med[key] / med[ref]:.3f} | {ref} |")
    if args.no_pipeline:
        return

    loader = BatchLoader(images, labels, b, shuffle=True, drop_last=True, augmentation=Augmentation(flip=True, crop_padding=4),
                         generator=torch.Generator().manual_seed(0), channels_last=True)
    t0 = time.perf_counter()
    count = 0
    for _ in range(3):
        for batch in loader:
            count += batch.images.shape[0]
    pipe = count / (time.perf_counter() - t0)
    consumed = b / med["ce (B)"]
    print(f"\ninput pipeline: {pipe:.0f} images/s delivered, the CE step consumes {consumed:.0f} images/s: {pipe / consumed:.1f}x")

    gen = torch.Generator().manual_seed(0)
    weak, strong = Augmentation(flip=True, crop_padding=4), RandAugment()
    randaugment_batch(images[:b].to(device), strong, gen)  # warm-up
    t0 = time.perf_counter()
    count = 0
    for _ in range(3):  # as many images as the plain pipeline above
        for start in range(0, n - b + 1, b):
            batch = augment_batch(images[start : start + b].to(device), weak, gen)
            randaugment_batch(batch, strong, gen)
            count += b
    sync()
    strong_rate = count / (time.perf_counter() - t0)
    print(f"with RandAugment (2 operations) and Cutout on top: {strong_rate:.0f} images/s, {strong_rate / consumed:.1f}x what the CE step consumes")


if __name__ == "__main__":
    main()
