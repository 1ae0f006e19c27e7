"""Plain reference implementations written from SPEC.md, one sample at a time."""

import torch


def spec_loop_probs(f, centres, centre_labels, theta, neighbours, sigma, num_classes):
    """SPEC §2 literally, one sample at a time, in linear space (the authors' formula)."""
    out = []
    for b in range(f.shape[0]):
        mass = [torch.zeros((), dtype=f.dtype) for _ in range(num_classes)]
        for j in neighbours[b].tolist():
            k = torch.exp(theta[j]) * torch.exp(-((f[b] - centres[j]) ** 2).sum() / (2 * sigma**2))
            mass[int(centre_labels[j])] = mass[int(centre_labels[j])] + k
        total = sum(mass)
        # The authors' code: an all-zero row (every kernel underflowed) gives 0 per class.
        p = torch.stack([m / total if total > 0 else m * 0 for m in mass])
        p = torch.where(p == 0, torch.full_like(p, 1e-10), p)
        out.append(p / p.sum())
    return torch.stack(out)


def spec_nearest(f, centres, k, exclude=None):
    nbrs = []
    for b in range(f.shape[0]):
        d = ((centres - f[b]) ** 2).sum(1)
        if exclude is not None:
            d[exclude[b]] = float("inf")
        kk = min(k, centres.shape[0] - (exclude is not None))
        nbrs.append(d.argsort()[:kk])
    return torch.stack(nbrs)
