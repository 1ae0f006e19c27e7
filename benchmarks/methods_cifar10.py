"""The five methods side by side on the CIFAR-10 archive with 10% of the labels.

Same data split, backbone and schedule for every method, and the same epochs unless
``--epochs`` gives them per method; each seed draws its own labelled split. Prints the
final-model and best-on-validation test accuracy (NNGK classifier), mean and standard
deviation over the seeds, the training time per run and per epoch, as a table and a
JSON file.

    python benchmarks/methods_cifar10.py --epochs 12 --out results/methods_cifar10.json
    python benchmarks/methods_cifar10.py --methods mbdml3,nngk,mixup --seeds 0,1,2 --epochs 30 \
        --set optimizer=sgd schedule=onecycle learning_rate=0.1 label_smoothing=0.1
    # an equal time budget: the single-pass methods get twice MbDML1's epochs
    python benchmarks/methods_cifar10.py --methods mbdml1,nngk,mixup --seeds 0,1,2 \
        --epochs mbdml1=70,nngk=140,mixup=140 --set preset=scratch amp=auto
    # self-training: each seed's MbDML1 run labels that seed's unlabelled images for a Mixup student
    python benchmarks/methods_cifar10.py --methods mixup --seeds 0,1,2 --epochs 5 --save_dir runs/student \
        --set preset=finetune amp=auto teacher=runs/teacher/mbdml1-seed{seed} pseudo_labeller=kernel_all
    # the same in one run per seed: MbDML1 trains 30 epochs as the teacher, labels, then 4 as the student
    # (the training time counts both stages and the labelling)
    python benchmarks/methods_cifar10.py --methods mbdml1 --seeds 0,1,2 --epochs 4 --eval_every 4 \
        --set preset=finetune amp=auto input_size=160 freeze_stages=4 frozen_cache_gb=10 update_interval=2 \
        teacher_epochs=30 teacher_fraction=0.8 pseudo_labeller=kernel_all

The figures depend on the machine's load: run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mbdml.config import make_config
from mbdml.train import build_trainer
from mbdml.training_data import prepare_data


def epochs_per_method(spec: str, methods: list[str]) -> dict[str, int]:
    """``"12"`` gives every method 12 epochs; ``"mbdml1=70,nngk=140"`` sets them one by
    one (every method must be named), for comparisons at an equal time budget."""
    if "=" not in spec:
        return {m: int(spec) for m in methods}
    given = {k.strip(): int(v) for k, v in (part.split("=", 1) for part in spec.split(","))}
    missing = [m for m in methods if m not in given]
    if missing:
        raise SystemExit(f"--epochs names no epoch count for {', '.join(missing)}; give one per method, e.g. {missing[0]}=40")
    return {m: given[m] for m in methods}


def run_comparison(
    dataset: str,
    methods: list[str],
    seeds: list[int],
    epochs: dict[str, int],
    extra: dict,
    save_dir: str,
    eval_every: int | None = None,
    method_settings: dict[str, dict] | None = None,
) -> list[dict]:
    """Train every method on every seed's split; one row of figures per run.
    ``method_settings`` adds (or overrides) settings of one method only."""
    base = dict(dataset=dataset, save_dir=save_dir, progress=False, **extra)
    rows = []
    for seed in seeds:
        data = prepare_data(make_config(seed=seed, **base))
        for method in methods:
            n = epochs[method]
            every = eval_every or max(1, n // 2)
            own = {**base, **(method_settings or {}).get(method, {})}
            # a setting may name the seed, e.g. teacher=runs/T/mbdml1-seed{seed}
            own = {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in own.items()}
            cfg = make_config(method=method, name=f"{method}-seed{seed}", seed=seed, max_epochs=n, eval_every=every, **own)
            t0 = time.perf_counter()
            res = build_trainer(cfg, data=data, run_dir=Path(save_dir) / f"{method}-seed{seed}").run()
            s = res.summary
            rows.append({
                "dataset": dataset,
                "method": method,
                "seed": seed,
                "epochs": n,
                "labelled_train_images": len(data.train),
                "final_nngk_acc": s["final"]["nngk_acc"],
                "final_knn_acc": s["final"]["knn_acc"],
                "final_val_acc": s["final"].get("val_acc"),
                "best_val_nngk_acc": s["best_val"]["nngk_acc"],
                "train_s_per_epoch": s["train_seconds_per_epoch"],
                # with --teacher_epochs, the teacher stage and the labelling belong to the run's training time
                "train_s": s["train_seconds_per_epoch"] * s["epochs"] + (
                    (s["self_training"].get("teacher_train_s") or 0.0) + s["self_training"]["teacher_s"]
                    if s.get("self_training", {}).get("teacher_epochs") else 0.0),
                "wall_s": time.perf_counter() - t0,
                **({"self_training": s["self_training"]} if "self_training" in s else {}),
            })
            val = rows[-1]["final_val_acc"]
            val_txt = "-" if val is None else f"{100 * val:.2f}%"
            print(f"{method} seed {seed}: final test {100 * s['final']['nngk_acc']:.2f}%, validation {val_txt}  ({rows[-1]['train_s'] / 60:.1f} min training, {rows[-1]['wall_s'] / 60:.1f} min wall)", flush=True)
    return rows


def mean_std(values: list[float | None]) -> str:
    """'mean ± sample std' in percent of the values given (None skipped); one value alone
    has no spread, so it is printed without one."""
    kept = [100 * v for v in values if v is not None]
    if not kept:
        return "-"
    mean = sum(kept) / len(kept)
    if len(kept) == 1:
        return f"{mean:.2f}"
    std = (sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) ** 0.5
    return f"{mean:.2f} ± {std:.2f}"


def comparison_table(rows: list[dict]) -> str:
    """A markdown table, one line per method (mean ± std over its seeds)."""
    lines = [
        "| method | epochs | seeds | final validation acc (recipe choices) | final NNGK test acc | final k-NN test acc | best-on-val NNGK test acc | train min/run | wall min/run | train s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        avg = lambda key: sum(r[key] for r in mine) / len(mine)  # noqa: E731
        seeds = ",".join(str(r["seed"]) for r in mine)
        lines.append(
            f"| {method} | {mine[0]['epochs']} | {seeds} | {mean_std([r['final_val_acc'] for r in mine])} | {mean_std([r['final_nngk_acc'] for r in mine])} "
            f"| {mean_std([r['final_knn_acc'] for r in mine])} | {mean_std([r['best_val_nngk_acc'] for r in mine])} | {avg('train_s') / 60:.1f} "
            f"| {avg('wall_s') / 60:.1f} | {avg('train_s_per_epoch'):.1f} |"
        )
    return "\n".join(lines)


def parse_settings(pairs: list[str]) -> dict:
    """KEY=VALUE strings to configuration values (JSON where it parses as JSON)."""
    def value(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text  # a bare word such as finetune or bf16

    return {k: value(v) for k, v in (s.split("=", 1) for s in pairs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--methods", default="nngk,mixup,mbdml1,mbdml2,mbdml3")
    p.add_argument("--epochs", default="12", help="epochs for every method (12), or per method for an equal time budget (mbdml1=70,nngk=140,mixup=140)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each draws its own labelled split")
    p.add_argument("--eval_every", type=int, default=None, help="epochs between evaluations (default: half the run's epochs)")
    p.add_argument("--save_dir", default="results/methods_cifar10")
    p.add_argument("--out", default="results/methods_cifar10.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra configuration values (JSON values)")
    args = p.parse_args()

    extra = parse_settings(args.set)
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = args.methods.split(",")
    epochs = epochs_per_method(args.epochs, methods)
    rows = run_comparison(args.dataset, methods, seeds, epochs, extra, args.save_dir, args.eval_every)
    print(f"\n{args.dataset}, {rows[0]['labelled_train_images']} labelled training images, seeds {args.seeds}, torch threads {torch.get_num_threads()}")
    print(f"settings: {json.dumps(extra)}")
    print(comparison_table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dataset": args.dataset, "epochs": epochs, "seeds": seeds, "rows": rows, "settings": extra}, indent=2))


if __name__ == "__main__":
    main()
