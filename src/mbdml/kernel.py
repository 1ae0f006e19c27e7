"""The nearest-neighbour Gaussian kernel classifier (NNGK) and its loss.

Meyer, Harwood and Drummond (ICIP 2018); the form used by Buris et al. (ICIP 2022).
Every labelled training image is a centre c_j (its embedding, computed without
gradient) with a learnable weight w_j = exp(theta_j). An embedding f is classified by
its K nearest centres:

    k_j(f) = w_j * exp(-||f - c_j||^2 / (2 sigma^2))
    P(c | f) = sum_{j in N(f), y_j = c} k_j(f) / sum_{j in N(f)} k_j(f)

A class with no neighbour in the list has no mass. Two floors are offered
(``class_floor``):

- ``"authors"``: as the authors' ``classifier.py`` computes it, the *unnormalised* mass
  of such a class is set to ``min_prob`` (1e-10) and only then are the masses
  normalised: P(absent) = 1e-10 / (S + n_absent 1e-10), S the total kernel mass. Its
  NLL is about 23.03 + log S, and its gradient lowers S (it pushes f away from its
  neighbours and shrinks their weights).
- ``"normalised"``: the probabilities of the classes present are normalised first and
  an absent class gets ``min_prob`` afterwards: a constant, with no gradient.

They differ only where a class is absent from the list, which is the usual case for
MbDML2/3's partner class once training has separated the classes. Everything here is
computed in log space (a log-sum-exp per class), so far-apart embeddings (large
distances over 2 sigma^2) do not underflow to the authors' flat, gradient-free loss;
where their formula does not underflow, ``"authors"`` equals it, values and gradients.
The whole batch is handled at once (no Python loop over samples).

Use it as a loss beside pytorch-metric-learning's::

    kernel = NNGKClassifier(num_classes=10, sigma=10.0, k=200, class_floor="authors")
    kernel.set_centres(labelled_embeddings, labelled_labels)   # at each refresh
    loss = kernel(embeddings, labels, indices)                 # indices: centre ids
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError
from .neighbours import CentreSearch, effective_k


# Where the floor of a class with no neighbour in the list applies (NNGKClassifier).
CLASS_FLOORS = ("authors", "normalised")


class _GatheredDot(torch.autograd.Function):
    """dots[b, j] = f[b] . centres[idx[b, j]], without a (B, K, D) tensor.

    Autograd would keep the whole gathered (B, K, D) tensor for the backward pass (210 MB
    at B = 128, K = 200, D = 2048), and allocating it afresh each step costs more than
    the arithmetic (page faults). Forward: the rows of a few samples at a time are
    gathered into one small reused workspace that stays in cache, then multiplied.
    Backward: grad_f[b] = sum_j g[b, j] centres[idx[b, j]] is exactly a weighted
    ``embedding_bag``, which reads the rows without copying them. No gradient flows to
    the centres.
    """

    _WORKSPACE_FLOATS = 1 << 19  # 2 MB of float32: a block that stays in cache

    @staticmethod
    def dots(f: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        b, k = idx.shape
        d = centres.shape[1]
        rows = max(2, _GatheredDot._WORKSPACE_FLOATS // max(1, k * d))
        out = f.new_empty(b, 1, k, dtype=centres.dtype)
        work = centres.new_empty(min(rows, b) * k, d)
        f = f.to(centres.dtype).unsqueeze(1)
        for i in range(0, b, rows):
            n = min(rows, b - i)
            block = work[: n * k]
            torch.index_select(centres, 0, idx[i : i + n].reshape(-1), out=block)
            # (n, 1, D) x (n, D, K): this layout takes a much faster kernel than (n, K, D) x (n, D, 1)
            torch.bmm(f[i : i + n], block.view(n, k, d).transpose(1, 2), out=out[i : i + n])
        return out.squeeze(1)

    @staticmethod
    def weighted_rows(weights: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx, centres, per_sample_weights=weights.to(centres.dtype).contiguous(), mode="sum")

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(centres, idx)
        return _GatheredDot.dots(f, centres, idx)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        centres, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _GatheredDot.weighted_rows(grad_out, centres, idx), None, None


class _SampledDot(torch.autograd.Function):
    """dots[b, j] = f[b] . centres[idx[b, j]] as a sampled dense product (SDDMM).

    The neighbour lists are the sparsity pattern of a (B, N) CSR matrix; the forward is
    ``torch.sparse.sampled_addmm`` (f times centres^T, evaluated only at the B x K
    listed entries) and the backward grad_f = G @ centres with G the same pattern
    holding the incoming gradient. Neither copies a (B, K, D) block of centre rows:
    on two CPU cores this is 2-3x faster than gathering at D = 128 and about 1.6x at
    D = 2048, where the step is bound by reading the scattered rows. Duplicate and
    unsorted indices within a row are fine (each entry is computed on its own). No
    gradient flows to the centres.
    """

    _beta_warning_seen = False

    @staticmethod
    def pattern(idx: torch.Tensor, values: torch.Tensor, num_centres: int) -> torch.Tensor:
        b, k = idx.shape
        crow = torch.arange(0, b * k + 1, k, device=idx.device, dtype=idx.dtype)
        # torch warns once per process that sparse CSR support is in beta; the ops used
        # here are stable, so that one warning is silenced (and no filter set after it).
        first = not _SampledDot._beta_warning_seen
        _SampledDot._beta_warning_seen = True
        with warnings.catch_warnings() if first else contextlib.nullcontext():
            if first:
                warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1), size=(b, num_centres), check_invariants=False)

    @staticmethod
    def dots(f: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        empty = _SampledDot.pattern(idx, centres.new_zeros(idx.numel()), centres.shape[0])
        out = torch.sparse.sampled_addmm(empty, f.to(centres.dtype), centres.t(), beta=0.0)
        return out.values().view(idx.shape)

    @staticmethod
    def weighted_rows(weights: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if centres.shape[1] < 512:  # narrow rows: embedding_bag's weighted sum is the faster reader
            return _GatheredDot.weighted_rows(weights, centres, idx)
        return _SampledDot.pattern(idx, weights.to(centres.dtype).contiguous(), centres.shape[0]) @ centres

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(centres, idx)
        return _SampledDot.dots(f, centres, idx)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        centres, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _SampledDot.weighted_rows(grad_out, centres, idx), None, None


def sampled_dot_supported(centres: torch.Tensor) -> bool:
    """Whether the SDDMM path serves these centres: float32/float64 on CPU or CUDA,
    confirmed once per device and dtype by a tiny probe (an older or partial sparse
    build falls back to gathering instead of failing mid-training)."""
    if centres.device.type not in ("cpu", "cuda") or centres.dtype not in (torch.float32, torch.float64):
        return False
    key = (str(centres.device), centres.dtype)
    if key not in _SAMPLED_DOT_PROBED:
        try:  # with gradients on, even when the first use comes under no_grad (evaluation)
            with torch.inference_mode(False), torch.enable_grad():
                _SAMPLED_DOT_PROBED[key] = _probe_sampled_dot(centres.device, centres.dtype)
        except (RuntimeError, NotImplementedError):
            _SAMPLED_DOT_PROBED[key] = False
    return _SAMPLED_DOT_PROBED[key]


def _probe_sampled_dot(device: torch.device, dtype: torch.dtype) -> bool:
    """One tiny forward and backward through :class:`_SampledDot`, checked."""
    c = torch.ones(3, 2, device=device, dtype=dtype)
    f = torch.ones(2, 2, device=device, dtype=dtype, requires_grad=True)
    out = _SampledDot.apply(f, c, torch.tensor([[0, 2], [1, 1]], device=device))
    out.sum().backward()
    return bool(torch.all(out == 2).item()) and bool(torch.all(f.grad == 2).item())


_SAMPLED_DOT_PROBED: dict[tuple[str, torch.dtype], bool] = {}


class _KernelLogProbs(torch.autograd.Function):
    """The whole NNGK log-probability computation as one autograd node.

    Inputs: f (B, D) live embeddings, theta (N,) log kernel weights, and, without
    gradient, the centres, their squared norms and labels, the (B, K) neighbour lists
    and an optional (B, K) validity mask. Output: log P(c | f), (B, C), with the
    classes that have no neighbour floored as ``authors_floor`` says (see the module
    docstring).

    Autograd would record about 25 small (B, K) operations and replay them backwards;
    this node keeps the neighbour lists, their labels and one (B, K) tensor of weights
    (plus three (B, C) ones) and writes the gradient in closed form. With
    L_c = log of class c's unnormalised mass (present classes) and r the log-masses
    the output is normalised from (L_c, or log ``min_prob`` for an absent class under
    the authors' floor):

        s_j    = k_j / (mass of class y_j)        (softmax within the neighbour's class)
        g      = G - exp(out) * sum_c G_c         (dLoss / dr, through the normalisation)
        authors:    h_c = g_c                     (present classes; an absent r_c is a constant)
        normalised: h_c = g_c - P_c * sum_{c present} g_c, with P_c = mass_c / total mass,
                    since r_c = L_c - log(total mass) there
        d logit_j = s_j * h_{y_j}
        d theta_j = sum of d logit over the places j appears
        d f_b  = (1 / sigma^2) (sum_j d logit_bj c_j - f_b sum_j d logit_bj)

    Under the normalised floor sum_j d logit_bj = 0 (the P_c of the present classes sum
    to 1), so the last term is left out, and ||f_b||^2, constant along a row of
    logits, cancels in the forward pass and is not computed. Under the authors' floor
    an absent class's mass is absolute (1e-10), so the logits carry ||f_b||^2 and the
    gradient its term.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        f: torch.Tensor,
        theta: torch.Tensor,
        centres: torch.Tensor,
        centre_sq: torch.Tensor,
        centre_labels: torch.Tensor,
        idx: torch.Tensor,
        valid: torch.Tensor | None,
        inv: float,
        log_min_prob: float,
        num_classes: int,
        dots_path: str,
        authors_floor: bool,
    ) -> torch.Tensor:
        b, k = idx.shape
        flat = idx.reshape(-1)
        dots = _neighbour_dots(f, centres, idx, dots_path)
        # log k_j(f) = theta_j - (||f||^2 - 2 f.c_j + ||c_j||^2) / 2 sigma^2; the
        # per-row -||f||^2 / 2 sigma^2 cancels under the normalised floor only
        logits = dots.mul_(2.0 * inv)
        logits += theta.index_select(0, flat).view(b, k)
        logits.sub_(centre_sq.index_select(0, flat).view(b, k), alpha=inv)
        if authors_floor:
            logits.sub_(f.pow(2).sum(1, keepdim=True).to(logits.dtype), alpha=inv)
        if valid is not None:
            logits.masked_fill_(~valid, float("-inf"))
        labels = centre_labels.index_select(0, flat).view(b, k)
        # Per-class log-sum-exp, each class shifted by its own best neighbour: a class
        # far behind the nearest one keeps a finite log-mass (and a gradient).
        class_max = logits.new_full((b, num_classes), float("-inf"))
        class_max.scatter_reduce_(1, labels, logits, reduce="amax", include_self=True)
        present = class_max > float("-inf")
        shift = class_max.masked_fill(~present, 0.0)
        e = logits.sub_(shift.gather(1, labels)).exp_()  # in (0, 1]; 0 where not valid
        class_mass = torch.zeros_like(class_max).scatter_add_(1, labels, e)
        class_lse = class_mass.clamp_min(torch.finfo(class_mass.dtype).tiny).log_().add_(shift)
        class_lse.masked_fill_(~present, float("-inf"))
        if authors_floor:  # the absent classes' unnormalised mass is min_prob, then one normalisation
            p_present = None
            r = torch.where(present, class_lse, torch.full_like(class_lse, log_min_prob))
        else:  # normalise over the present classes, then floor the absent ones and renormalise
            total_lse = torch.logsumexp(class_lse, dim=1, keepdim=True)
            r = class_lse - total_lse  # log P_c of the present classes (NaN in a row with none)
            p_present = torch.where(present, r.exp(), torch.zeros_like(r))
            r = torch.where(present, r, torch.full_like(r, log_min_prob))
        out = r - torch.logsumexp(r, dim=1, keepdim=True)
        s = e.div_(class_mass.gather(1, labels).clamp_min(torch.finfo(e.dtype).tiny))
        ctx.save_for_backward(f if authors_floor else None, centres, idx, labels, s, p_present, present, out)
        ctx.inv = inv
        ctx.dots_path = dots_path
        ctx.num_theta = theta.shape[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        f, centres, idx, labels, s, p_present, present, out = ctx.saved_tensors
        g = grad_out - out.exp() * grad_out.sum(1, keepdim=True)
        h = g.masked_fill(~present, 0.0)
        if p_present is not None:  # normalised floor: through the normalisation over present classes
            h = h - p_present * h.sum(1, keepdim=True)
        d_logits = s * h.gather(1, labels)
        grad_f = grad_theta = None
        if ctx.needs_input_grad[0]:
            grad_f = _weighted_centre_rows(d_logits, centres, idx, ctx.dots_path)
            if f is not None:  # authors' floor: the -||f||^2 / 2 sigma^2 in every logit
                grad_f = grad_f - f.to(grad_f.dtype) * d_logits.sum(1, keepdim=True)
            grad_f = grad_f.mul_(2.0 * ctx.inv)
        if ctx.needs_input_grad[1]:
            grad_theta = d_logits.new_zeros(ctx.num_theta).index_add_(0, idx.reshape(-1), d_logits.reshape(-1))
        return (grad_f, grad_theta) + (None,) * 10


def _neighbour_dots(f: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor, path: str) -> torch.Tensor:
    """dots[b, j] = f[b] . centres[idx[b, j]], a fresh (B, K) tensor, no autograd."""
    if path == "dense":  # few centres: one small matrix product, then a gather
        return (f @ centres.t()).gather(1, idx)
    if path == "sampled":
        return _SampledDot.dots(f, centres, idx)
    return _GatheredDot.dots(f, centres, idx)


def _weighted_centre_rows(weights: torch.Tensor, centres: torch.Tensor, idx: torch.Tensor, path: str) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] centres[idx[b, j]], (B, D): the backward of the dots."""
    if path == "dense":
        full = weights.new_zeros(idx.shape[0], centres.shape[0]).scatter_add_(1, idx, weights)
        return full @ centres
    if path == "sampled":
        return _SampledDot.weighted_rows(weights, centres, idx)
    return _GatheredDot.weighted_rows(weights, centres, idx)


class NNGKClassifier(nn.Module):
    """Nearest-neighbour Gaussian kernel classifier: centres, kernel weights, loss.

    Args:
        num_classes: number of classes (may also be given at :meth:`set_centres`).
        sigma: kernel width, fixed (the paper: 10).
        k: number of nearest centres taking part (the paper: 200).
        min_prob: the floor of a class with no neighbour in the list (1e-10, the authors').
        class_floor: where that floor applies: ``"authors"`` (to the unnormalised class
            mass, then one normalisation, as the authors' classifier.py) or
            ``"normalised"`` (to the probability, after normalising over the classes
            present: a constant with no gradient). See the module docstring.
        learn_weights: whether the per-centre weights theta_j are trained.
        search_backend: neighbour search, see :func:`mbdml.neighbours.knn_search`.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        sigma: float = 10.0,
        k: int = 200,
        *,
        min_prob: float = 1e-10,
        class_floor: str = "normalised",
        learn_weights: bool = True,
        search_backend: str = "torch",
    ) -> None:
        super().__init__()
        if not sigma > 0 or not math.isfinite(sigma):
            raise ConfigError(f"sigma must be a positive number, got {sigma}; pass --sigma 10 (the paper's value) or another positive width")
        if k < 1:
            raise ConfigError(f"K (the number of neighbours) must be at least 1, got {k}; pass --k 200 (the paper's value) or another positive count")
        if not 0 < min_prob < 1:
            raise ConfigError(f"min_prob must be in (0, 1), got {min_prob}")
        if class_floor not in CLASS_FLOORS:
            raise ConfigError(f"class_floor {class_floor!r} is not known; choose one of: {', '.join(CLASS_FLOORS)}")
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.k = int(k)
        self.min_prob = float(min_prob)
        self.class_floor = class_floor
        self.search_backend = search_backend
        self.log_weights = nn.Parameter(torch.zeros(0), requires_grad=learn_weights)
        self.register_buffer("centres", torch.zeros(0, 0))
        self.register_buffer("centre_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("train_neighbours", torch.zeros(0, 0, dtype=torch.long))
        self.register_buffer("_num_classes_buf", torch.tensor(num_classes if num_classes else 0))

    # ------------------------------------------------------------------ centres
    @property
    def num_centres(self) -> int:
        return int(self.centres.shape[0])

    @torch.no_grad()
    def set_centres(
        self,
        centres: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int | None = None,
        *,
        train_neighbours: bool = True,
    ) -> None:
        """Store the centres (embeddings of the labelled images) and their labels.

        Called before training and at every refresh. When the number of centres is
        unchanged the kernel weights are kept (they belong to the images, not to the
        embeddings); otherwise they are reset to 0, and an optimiser holding the old
        parameter must be rebuilt. With ``train_neighbours`` the K nearest other
        centres of every centre are computed here and kept until the next refresh.
        """
        if centres.dim() != 2:
            raise ValueError(f"centres must be (N, D), got shape {tuple(centres.shape)}")
        if labels.shape != (centres.shape[0],):
            raise ValueError(f"labels must be ({centres.shape[0]},), got {tuple(labels.shape)}")
        if centres.shape[0] == 0:
            raise DataError("the labelled set is empty, so the kernel classifier has no centres; label at least one image per class")
        if not torch.isfinite(centres).all():
            raise DataError("some centre embeddings are NaN or infinite; the model diverged: lower the learning rate")
        if num_classes is not None:
            self.num_classes = int(num_classes)
        if self.num_classes is None:
            self.num_classes = int(labels.max()) + 1
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise DataError(f"centre labels must lie in [0, {self.num_classes}), found {int(labels.min())}..{int(labels.max())}; check --num_classes")
        self._num_classes_buf.fill_(self.num_classes)
        self._pending = None  # superseded by the new centres
        self._sq_norms = None
        centres = centres.detach().float()
        n = centres.shape[0]
        if self.log_weights.numel() != n:
            self.log_weights = nn.Parameter(torch.zeros(n, device=centres.device), requires_grad=self.log_weights.requires_grad)
        self.centres = centres.clone()
        self.centre_labels = labels.detach().long().to(centres.device).clone()
        if train_neighbours:
            self.train_neighbours = self.centre_search.self_search(self.k).indices
        else:
            self.train_neighbours = torch.zeros(0, 0, dtype=torch.long, device=centres.device)

    @torch.no_grad()
    def set_training_neighbours(self, neighbours: torch.Tensor) -> None:
        """Store training neighbour lists computed elsewhere (e.g. a shard per process).

        ``neighbours`` is (N, K') with K' = min(K, N - 1) centre indices per centre, its
        own index excluded, as :meth:`set_centres` would have computed them.
        """
        self._require_centres()
        n = self.num_centres
        k = effective_k(self.k, n, 1)
        if neighbours.shape != (n, k):
            raise ValueError(f"training neighbours must be ({n}, {k}), got {tuple(neighbours.shape)}")
        if k and (int(neighbours.min()) < 0 or int(neighbours.max()) >= n):
            raise ValueError("training neighbour indices must lie in [0, number of centres)")
        self.train_neighbours = neighbours.to(device=self.centres.device, dtype=torch.long).clone()

    def update_centres(self, indices: torch.Tensor, embeddings: torch.Tensor, momentum: float = 0.0) -> None:
        """Move the centres of these images towards their latest embeddings (a memory bank).

        c_i <- m c_i + (1 - m) f_i. Between refreshes the centres then follow the network
        instead of staying where the last refresh put them; the neighbour lists are kept.
        The write is applied just before the centres are next read, so that it never
        changes a tensor the current backward pass still needs.
        """
        self._flush_pending()
        self._pending = (indices.detach(), embeddings.detach().to(self.centres.dtype), float(momentum))

    @torch.no_grad()
    def _flush_pending(self) -> None:
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        self._pending = None
        indices, f, m = pending
        self.centres[indices] = f if m == 0.0 else m * self.centres[indices] + (1.0 - m) * f
        self._centre_search = None  # its index holds the old centres
        if getattr(self, "_sq_norms", None) is not None:
            self._sq_norms = self._sq_norms.clone()  # the old one may be saved for a backward pass
            self._sq_norms[indices] = self.centres[indices].pow(2).sum(1)

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._flush_pending()
        super()._save_to_state_dict(*args, **kwargs)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The centre tensors change size with the labelled set: resize before copying.
        for name in ("centres", "centre_labels", "train_neighbours", "_num_classes_buf"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        key = prefix + "log_weights"
        if key in state_dict and state_dict[key].shape != self.log_weights.shape:
            self.log_weights = nn.Parameter(torch.zeros_like(state_dict[key]), requires_grad=self.log_weights.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sq_norms = None
        if int(self._num_classes_buf) > 0:
            self.num_classes = int(self._num_classes_buf)

    def _require_centres(self) -> None:
        self._flush_pending()
        if self.num_centres == 0:
            raise RuntimeError("the kernel classifier has no centres yet: call set_centres(embeddings, labels) first")

    # --------------------------------------------------------------- neighbours
    @property
    def centre_search(self) -> CentreSearch:
        """The search over the current centres: made once per refresh (a faiss index is
        built, and trained, once) and used by every search until the centres change."""
        self._require_centres()
        search = getattr(self, "_centre_search", None)
        if search is None or search.centres is not self.centres or search.backend != self.search_backend:
            search = self._centre_search = CentreSearch(self.centres, self.search_backend)
        return search

    def neighbours(self, embeddings: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (B, K) of the K nearest centres of each embedding (a fresh search)."""
        return self.centre_search.search(embeddings.detach(), self.k, exclude=exclude).indices

    def training_neighbours(self, indices: torch.Tensor) -> torch.Tensor:
        """The neighbour lists kept since the last refresh for these centre indices."""
        self._require_centres()
        if self.train_neighbours.numel() == 0 and effective_k(self.k, self.num_centres, 1) > 0:
            raise RuntimeError("training neighbour lists were not computed: call set_centres(..., train_neighbours=True)")
        return self.train_neighbours[indices]

    # ----------------------------------------------------------- probabilities
    def log_probs(
        self,
        embeddings: torch.Tensor,
        neighbour_indices: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log class probabilities (B, C) of each embedding given its neighbour lists.

        Args:
            embeddings: (B, D), live (gradients flow into them and the kernel weights).
            neighbour_indices: (B, K) centre indices.
            valid: optional (B, K) bool mask; False entries take no part (used to drop
                duplicates when two neighbour lists are merged).
        """
        self._require_centres()
        b, k = neighbour_indices.shape
        c = int(self.num_classes)
        if k == 0:  # no neighbour at all (a single labelled image): uniform
            return embeddings.new_full((b, c), -math.log(c))
        # float32 at least, also under autocast (distances of nearby embeddings need it);
        # float64 where the centres are (kernel.double(), for exact comparisons)
        dtype = torch.float64 if self.centres.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self._log_probs_fp32(embeddings.to(dtype), neighbour_indices, valid)

    @torch.no_grad()
    def log_probs_every_centre(self, embeddings: torch.Tensor, block_entries: int = 2**24) -> torch.Tensor:
        """Log class probabilities (B, C) with every centre as a neighbour (no K cut).

        With the K nearest only, an image whose K neighbours all share a class gets a
        probability of exactly 1, whatever sigma; over every centre the far ones still
        weigh in, so the probabilities keep an order (used to rank pseudo-labels). Rows
        go in blocks of about ``block_entries`` (rows x centres) entries.
        """
        self._require_centres()
        every = torch.arange(self.num_centres, device=embeddings.device)
        rows = max(1, block_entries // max(1, self.num_centres))
        return torch.cat([self.log_probs(part, every.expand(part.shape[0], -1)) for part in embeddings.split(rows)])

    def _log_probs_fp32(self, f: torch.Tensor, neighbour_indices: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """log P(c | f) through :class:`_KernelLogProbs`, one autograd node.

        No (N, N) matrix and no (B, K, D) tensor is built: the dot products f_b . c_j
        come from one small matrix product then a gather when the centres are few, or
        from a sampled sparse product (:class:`_SampledDot`) otherwise, with gathering
        (:class:`_GatheredDot`) as the fallback on other devices and dtypes. Only B x K
        entries of the per-centre terms are gathered, so a step costs nothing in
        proportion to N (millions of centres).
        """
        centres = self.centres
        k = neighbour_indices.shape[1]
        if centres.shape[0] <= 8 * k:
            path = "dense"
        elif sampled_dot_supported(centres):
            path = "sampled"
        else:
            path = "gathered"
        return _KernelLogProbs.apply(
            f,
            self.log_weights,
            centres,
            self._centre_sq_norms(),
            self.centre_labels,
            neighbour_indices,
            valid,
            1.0 / (2.0 * self.sigma**2),
            math.log(self.min_prob),
            int(self.num_classes),
            path,
            self.class_floor == "authors",
        )

    def _centre_sq_norms(self) -> torch.Tensor:
        """||c_j||^2 of every centre, cached until the centres change."""
        cached = getattr(self, "_sq_norms", None)
        if cached is None or cached.shape[0] != self.centres.shape[0] or cached.device != self.centres.device:
            cached = self.centres.pow(2).sum(1)
            self._sq_norms = cached
        return cached

    def predict_log_proba(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Log probabilities (B, C) using the K nearest of all centres (test time)."""
        return self.log_probs(embeddings, self.neighbours(embeddings))

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted labels (B,), computed in blocks."""
        out = [self.predict_log_proba(embeddings[i : i + batch_size]).argmax(1) for i in range(0, embeddings.shape[0], batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=embeddings.device)

    # ---------------------------------------------------------------------- loss
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
        neighbour_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean negative log-likelihood of the true class (the NNGK loss).

        Args:
            embeddings: (B, D) live embeddings.
            labels: (B,) true classes.
            indices: (B,) the samples' own centre indices: their neighbour lists from
                the last refresh are used (own centre excluded). Without it, a fresh
                search among all centres is made (test-time neighbours).
            neighbour_indices: (B, K) explicit neighbour lists, overriding both.
        """
        if neighbour_indices is None:
            neighbour_indices = self.training_neighbours(indices) if indices is not None else self.neighbours(embeddings)
        return F.nll_loss(self.log_probs(embeddings, neighbour_indices), labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, sigma={self.sigma}, k={self.k}, class_floor={self.class_floor}, centres={self.num_centres}"
