"""How right the pseudo-labels of a trained run are, by what labels them and how many are kept.

Reads a run folder (a method with a mixup head: mbdml1, mixup, mbdml1_semi), embeds a
random subset of its unlabelled training images (the same split, drawn from the run's
seed), and labels them as ``--pseudo_labeller`` would:

- kernel: the kernel classifier's class probabilities (K nearest centres);
- kernel_all: the kernel classifier on every centre;
- head: the mixup head's softmax;
- mean: the mean of the kernel's and the head's probabilities.

For each share of the images kept by rank (per predicted class, the most confident, as
``--pseudo_fraction`` keeps them) it prints the share of kept pseudo-labels that are
right, using the hidden labels. It also prints how often the kernel's top probability
is exactly 1.0 (all K nearest centres of one class: no order among those images) and
the accuracy when the kernel and the head agree. A diagnostic: nothing here feeds a training run.

    python benchmarks/pseudo_labellers.py runs/V/mbdml1-seed0 --images 5000
"""

from __future__ import annotations

import argparse
import time

import torch

from mbdml.components import load_run
from mbdml.embedder import Embedder
from mbdml.methods import PSEUDO_LABELLERS
from mbdml.precision import device_has_native_bf16
from mbdml.pseudo_labels import labeller_probabilities, select_by_rank
from mbdml.training_data import prepare_data


def kept_accuracy(probs: torch.Tensor, truth: torch.Tensor, share: float) -> float:
    """Share of right labels among the images kept by rank at ``share``."""
    conf, lab = probs.max(1)
    keep = select_by_rank(conf, lab, probs.shape[1], share) if share < 1 else torch.ones_like(lab, dtype=torch.bool)
    return float((lab[keep] == truth[keep]).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder written by mbdml train (method with a mixup head)")
    p.add_argument("--which", default="last", choices=("last", "best"), help="checkpoint to read (default last)")
    p.add_argument("--images", type=int, default=5000, help="unlabelled images to label, a random subset (default 5000)")
    p.add_argument("--shares", default="0.1,0.2,0.4,0.6,0.8,1.0", help="shares of the images kept by rank")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run = load_run(args.run_dir, which=args.which)
    if not run.method.has_head:
        raise SystemExit(f"{args.run_dir} was trained with {run.config.method}, which has no mixup head; use an mbdml1, mixup or mbdml1_semi run")
    cfg = run.config
    unl = prepare_data(cfg).unlabelled
    if unl is None or len(unl) == 0:
        raise SystemExit(f"{args.run_dir} has no unlabelled images (labelled_fraction {cfg.labelled_fraction})")
    pick = torch.randperm(len(unl), generator=torch.Generator().manual_seed(0))[: args.images]
    truth = unl.labels[pick]
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    amp = "bf16" if cfg.amp != "none" and device_has_native_bf16(cpu) else "none"  # float32 where bfloat16 is emulated
    emb = Embedder.for_run(run.model, cfg, cpu, amp=amp).embed(unl.images[pick])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        nbrs = run.kernel.neighbours(emb)
        labellers = {name: labeller_probabilities(name, run.kernel, emb, nbrs, run.method.head) for name in PSEUDO_LABELLERS}
    kernel, head = labellers["kernel"], labellers["head"]

    print(f"{run.config.method}, seed {cfg.seed}, epoch {run.epoch}: {len(pick)} of {len(unl)} unlabelled images embedded in {seconds:.0f} s")
    top = kernel.max(1).values
    print(f"kernel top probability: == 1.0 for {float((top >= 1).float().mean()):.1%} of the images; "
          f"quartiles {', '.join(f'{q:.4f}' for q in top.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist())}")
    agree = kernel.argmax(1) == head.argmax(1)
    print(f"kernel and head agree on {float(agree.float().mean()):.1%} of the images, "
          f"{float((kernel.argmax(1)[agree] == truth[agree]).float().mean()):.2%} of those are right")
    print()
    print("| share kept | " + " | ".join(labellers) + " |")
    print("|---|" + "---|" * len(labellers))
    for share in (float(s) for s in args.shares.split(",")):
        row = " | ".join(f"{100 * kept_accuracy(probs, truth, share):.2f}" for probs in labellers.values())
        print(f"| {share:.1f} | {row} |")


if __name__ == "__main__":
    main()
