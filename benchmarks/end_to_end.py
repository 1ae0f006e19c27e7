"""Training images per second, end to end, each method against plain cross-entropy,
with and without ``--amp bf16`` and ``--compile``, measured side by side in one run.

The CIFAR-10 archive with 10% labels (4,500 training images after the validation part),
``resnet_small``; each configuration trains ``--epochs`` epochs (2) and the last is timed
(the first includes compilation and warm-up). Evaluation is left out of the timing.

    python benchmarks/end_to_end.py --methods softmax,mbdml2,mbdml3 --modes plain,bf16,bf16+compile
    python benchmarks/end_to_end.py --device cuda --methods softmax,mbdml2 --modes plain,bf16
"""

from __future__ import annotations

import argparse
import tempfile

from mbdml.config import make_config
from mbdml.train import build_trainer
from mbdml.training_data import prepare_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--methods", default="softmax,nngk,mixup,mbdml1,mbdml2,mbdml3")
    p.add_argument("--modes", default="plain,bf16,bf16+compile")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (the trainer's --device)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per configuration; the last one is timed (at least 2)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
    args = p.parse_args()
    modes = {"plain": {}, "bf16": {"amp": "bf16"}, "compile": {"compile": True}, "bf16+compile": {"amp": "bf16", "compile": True}}
    base = dict(dataset=args.dataset, max_epochs=max(2, args.epochs), eval_every=1000, update_interval=1000, retrieval_metrics=False,
                progress=False, device=args.device)
    if args.batch_size:
        base["batch_size"] = args.batch_size
    data = prepare_data(make_config(**base))
    n = len(data.train)
    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for method in args.methods.split(","):
                cfg = make_config(method=method, save_dir=tmp, name=f"{method}-{mode}", **base, **modes[mode])
                res = build_trainer(cfg, data=data).run()
                seconds = res.history[-1]["train_s"]
                rates[(method, mode)] = n / seconds
                print(f"{method:>8} {mode:>13}: {n / seconds:6.0f} images/s", flush=True)
    ms = args.modes.split(",")
    print(f"\n{args.dataset}, {n} labelled training images, device {args.device}, images/s of epoch {max(2, args.epochs)} "
          "(ratio to plain cross-entropy in the same mode)")
    print("| method | " + " | ".join(ms) + " |")
    print("|---|" + "---|" * len(ms))
    for method in args.methods.split(","):
        cells = [f"{rates[(method, m)]:.0f} ({rates[(method, m)] / rates[('softmax', m)]:.2f})" if ("softmax", m) in rates else f"{rates[(method, m)]:.0f}" for m in ms]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
