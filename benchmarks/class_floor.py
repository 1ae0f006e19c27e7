"""The two class floors side by side with the authors' formula, on a few neighbour lists.

    python benchmarks/class_floor.py

For each case (every class in the list; the true class absent; the mixup partner
class absent) it prints the NLL and the gradient norms on the embedding and on the
kernel weights under ``class_floor="authors"``, ``"normalised"``, and the authors'
per-sample formula (their classifier.py, transcribed in tests/spec_reference.py),
all in float64. Centres: 40 random 16-d points of 4 classes, sigma 1.5, K 10.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from spec_reference import authors_classifier_log_probs  # noqa: E402

from mbdml.kernel import NNGKClassifier  # noqa: E402


def main() -> None:
    g = torch.Generator().manual_seed(11)
    n, d, c, sigma = 40, 16, 4, 1.5
    centres = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5
    labels = torch.arange(n) % c
    theta = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    by_class = [torch.nonzero(labels == k).flatten() for k in range(c)]
    cases = {
        "every class present, true class 0": (torch.cat([by_class[0][:3], by_class[1][:3], by_class[2][:2], by_class[3][:2]]), 0),
        "true class 0 absent": (torch.cat([by_class[1][:5], by_class[2][:5]]), 0),
        "partner class 0 absent (list: class 2 only)": (by_class[2][:10], 0),
    }
    print(f"{'case':46s} {'floor':11s} {'NLL':>9s} {'|grad f|':>10s} {'|grad w|':>10s}")
    for name, (nbrs, y) in cases.items():
        f0 = centres[nbrs[0]] + 0.7 * torch.randn(d, generator=g, dtype=torch.float64)
        for floor in ("authors", "normalised", "their code"):
            f = f0.clone().unsqueeze(0).requires_grad_()
            w = theta.clone().requires_grad_()
            if floor == "their code":
                log_p = authors_classifier_log_probs(f, centres, labels, w, nbrs.unsqueeze(0), sigma, c)
            else:
                kernel = NNGKClassifier(num_classes=c, sigma=sigma, k=10, class_floor=floor).double()
                kernel.set_centres(centres, labels, train_neighbours=False)
                kernel.centres = centres.clone()
                with torch.no_grad():
                    kernel.log_weights.copy_(theta)
                w = kernel.log_weights
                log_p = kernel.log_probs(f, nbrs.unsqueeze(0))
            nll = -log_p[0, y]
            gf, gw = torch.autograd.grad(nll, [f, w])
            print(f"{name:46s} {floor:11s} {nll.item():9.4f} {gf.norm().item():10.3e} {gw.norm().item():10.3e}")


if __name__ == "__main__":
    main()
