"""Plain reference implementations, one sample at a time, in linear space.

Two independent references for the kernel classifier:

- :func:`spec_loop_probs` restates SPEC.md §2 (either floor);
- :func:`authors_classifier_log_probs` transcribes the per-sample loop of the authors'
  ``classifier.py`` (``GaussianKernels.forward``, repository henriqueburis/MbDMLs)
  in their order of operations: squared distances, ``exp(-d / 2 sigma^2) * w``, the
  per-class sums, ``p[p == 0] = 1e-10``, ``p / p.sum()``, ``log``.
"""

import torch


def spec_loop_probs(f, centres, centre_labels, theta, neighbours, sigma, num_classes, floor="authors"):
    """SPEC §2 literally: class masses m_c, then the floor of a class with no mass.

    ``floor="authors"``: m_c = 1e-10 for such a class, then P = m / sum(m).
    ``floor="normalised"``: P over the classes with mass first, then 1e-10 for the
    others and one more normalisation. An all-zero row (every kernel underflowed) gives
    1e-10 to every class in both.
    """
    out = []
    for b in range(f.shape[0]):
        mass = [torch.zeros((), dtype=f.dtype) for _ in range(num_classes)]
        for j in neighbours[b].tolist():
            k = torch.exp(theta[j]) * torch.exp(-((f[b] - centres[j]) ** 2).sum() / (2 * sigma**2))
            mass[int(centre_labels[j])] = mass[int(centre_labels[j])] + k
        m = torch.stack(mass)
        if floor == "normalised":
            total = m.sum()
            m = m / total if total > 0 else m * 0
        m = torch.where(m == 0, torch.full_like(m, 1e-10), m)
        out.append(m / m.sum())
    return torch.stack(out)


def authors_classifier_log_probs(features, centres, centre_labels, log_weights, neighbours, sigma, num_classes):
    """The authors' classifier, written from reading their ``classifier.py``.

    For each sample: d = sum((f - c_j)^2) over its neighbours; d = exp(-d / (2 sigma^2))
    times exp(weight_j); per class, the sum of d over the neighbours of that class
    (a class x neighbour matrix, summed over neighbours); zeros set to 1e-10; divided
    by the sum; log. Gradients flow as in their code (the in-place floor leaves the
    floored entries without one).
    """
    gaussian_constant = 1.0 / (2.0 * sigma**2)
    kernel_weights = torch.exp(log_weights)
    classes = torch.arange(num_classes).view(num_classes, 1)
    rows = []
    for ii in range(features.shape[0]):
        nb = neighbours[ii, :]
        d = torch.pow(features[ii, :] - centres[nb], 2).sum(1)
        d = torch.exp(-d * gaussian_constant) * kernel_weights[nb]
        nb_labels = centre_labels[nb].view(1, nb.shape[0])
        p_arr = torch.zeros(num_classes, d.shape[0], dtype=features.dtype)
        idx = classes == nb_labels
        p_arr[idx] = d.expand(num_classes, -1)[idx]
        p_ii = p_arr.sum(1)
        p_ii[p_ii == 0] = 1e-10
        p_ii = p_ii / p_ii.sum()
        rows.append(torch.log(p_ii).view(1, num_classes))
    return torch.cat(rows)


def spec_nearest(f, centres, k, exclude=None):
    nbrs = []
    for b in range(f.shape[0]):
        d = ((centres - f[b]) ** 2).sum(1)
        if exclude is not None:
            d[exclude[b]] = float("inf")
        kk = min(k, centres.shape[0] - (exclude is not None))
        nbrs.append(d.argsort()[:kk])
    return torch.stack(nbrs)
