"""The five methods side by side on the CIFAR-10 archive with 10% of the labels.

Same data split, backbone, schedule and epochs for every method; one seed. Prints the
final-model and best-on-validation test accuracy (NNGK classifier) and the training wall
time per epoch, as a table and a JSON file.

    python benchmarks/methods_cifar10.py --epochs 12 --out results/methods_cifar10.json

The figures depend on the machine's load: run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mbdml.config import make_config
from mbdml.train import Trainer, prepare_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--methods", default="nngk,mixup,mbdml1,mbdml2,mbdml3")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=4)
    p.add_argument("--save_dir", default="results/methods_cifar10")
    p.add_argument("--out", default="results/methods_cifar10.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra configuration values (JSON values)")
    args = p.parse_args()

    extra = {k: json.loads(v) if v[:1] in "0123456789-[{tfn" else v for k, v in (s.split("=", 1) for s in args.set)}
    base = dict(dataset=args.dataset, max_epochs=args.epochs, seed=args.seed, eval_every=args.eval_every, save_dir=args.save_dir, progress=False, **extra)
    data = prepare_data(make_config(**base))
    rows = []
    for method in args.methods.split(","):
        cfg = make_config(method=method, name=method, **base)
        t0 = time.perf_counter()
        res = Trainer(cfg, data=data, run_dir=Path(args.save_dir) / method).run()
        s = res.summary
        rows.append({
            "method": method,
            "final_nngk_acc": s["final"]["nngk_acc"],
            "final_knn_acc": s["final"]["knn_acc"],
            "best_val_nngk_acc": s["best_val"]["nngk_acc"],
            "train_s_per_epoch": s["train_seconds_per_epoch"],
            "wall_s": time.perf_counter() - t0,
        })
        print(f"{method}: final {100 * s['final']['nngk_acc']:.2f}%  ({s['train_seconds_per_epoch']:.1f} s/epoch training)", flush=True)

    print(f"\n{args.dataset}, {len(data.train)} labelled training images, {args.epochs} epochs, seed {args.seed}, torch threads {torch.get_num_threads()}")
    print("| method | final NNGK acc | final k-NN acc | best-on-val NNGK acc | train s/epoch | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {100 * r['final_nngk_acc']:.2f} | {100 * r['final_knn_acc']:.2f} | {100 * (r['best_val_nngk_acc'] or float('nan')):.2f} | {r['train_s_per_epoch']:.1f} | {r['wall_s']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "seed": args.seed, "rows": rows, "config": base}, indent=2))


if __name__ == "__main__":
    main()
