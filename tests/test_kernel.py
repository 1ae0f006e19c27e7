"""The NNGK classifier against a plain per-sample loop written from SPEC.md §2."""

import math

import pytest
import torch

from mbdml.errors import ConfigError, DataError
from mbdml.kernel import NNGKClassifier

from spec_reference import spec_loop_probs, spec_nearest


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    n, d, c = 60, 8, 4
    centres = torch.randn(n, d, generator=g) * 3
    labels = torch.arange(n) % c
    kernel = NNGKClassifier(num_classes=c, sigma=2.0, k=15)
    kernel.set_centres(centres, labels)
    with torch.no_grad():
        kernel.log_weights.copy_(torch.randn(n, generator=g) * 0.3)
    return kernel, centres, labels, g


def test_training_neighbours_exclude_own_centre(setup):
    kernel, centres, labels, _ = setup
    own = torch.arange(centres.shape[0])
    expected = spec_nearest(centres, centres, kernel.k, exclude=own)
    assert torch.equal(kernel.train_neighbours, expected)
    assert not (kernel.train_neighbours == own.unsqueeze(1)).any()


def test_log_probs_match_plain_loop(setup):
    kernel, centres, labels, g = setup
    f = (centres[:10] + 0.5 * torch.randn(10, centres.shape[1], generator=g)).requires_grad_()
    nbrs = kernel.training_neighbours(torch.arange(10))
    ours = kernel.log_probs(f, nbrs).exp()
    ref = spec_loop_probs(f.double(), centres.double(), labels, kernel.log_weights.double(), nbrs, kernel.sigma, 4, floor=kernel.class_floor)
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    # Gradients reach the embeddings and the kernel weights, the same as the loop's.
    y = labels[:10]
    loss = kernel(f, y, torch.arange(10))
    g_f, g_w = torch.autograd.grad(loss, [f, kernel.log_weights])
    f2 = f.detach().double().requires_grad_()
    w2 = kernel.log_weights.detach().double().requires_grad_()
    ref2 = spec_loop_probs(f2, centres.double(), labels, w2, nbrs, kernel.sigma, 4, floor=kernel.class_floor)
    ref_loss = -torch.log(ref2[torch.arange(10), y]).mean()
    r_f, r_w = torch.autograd.grad(ref_loss, [f2, w2])
    assert torch.allclose(loss.double(), ref_loss, atol=1e-6)
    assert torch.allclose(g_f.double(), r_f, atol=1e-6)
    assert torch.allclose(g_w.double(), r_w, atol=1e-6)
    assert kernel.centres.grad is None


def test_missing_class_gets_min_prob_then_renormalised(setup):
    kernel, centres, labels, _ = setup
    # Neighbour list drawn only from classes 0 and 1: classes 2 and 3 get 1e-10.
    nbrs = torch.tensor([[0, 1, 4, 5]])
    p = kernel.log_probs(centres[:1], nbrs).exp()[0].detach()
    assert float(p[2]) == pytest.approx(1e-10 / (1 + 2e-10), rel=1e-4)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-6)


def test_predict_uses_all_centres_and_matches_loop(setup):
    kernel, centres, labels, g = setup
    q = torch.randn(25, centres.shape[1], generator=g) * 3
    nbrs = spec_nearest(q, centres, kernel.k)
    ref = spec_loop_probs(q.double(), centres.double(), labels, kernel.log_weights.double(), nbrs, kernel.sigma, 4, floor=kernel.class_floor)
    assert torch.equal(kernel.predict(q), ref.argmax(1))


def test_log_probs_every_centre_matches_the_loop_over_all_centres_in_any_block_size(setup):
    kernel, centres, labels, g = setup
    q = torch.randn(25, centres.shape[1], generator=g) * 3
    every = torch.arange(centres.shape[0]).expand(25, -1)
    ref = spec_loop_probs(q.double(), centres.double(), labels, kernel.log_weights.double(), every, kernel.sigma, 4, floor=kernel.class_floor)
    for block in (60, 7 * 60, 2**24):  # one row per block, 7 rows, all rows at once
        ours = kernel.log_probs_every_centre(q, block_entries=block).exp()
        assert ours.shape == (25, 4)
        assert torch.allclose(ours.double(), ref, atol=1e-6)
    near = kernel.log_probs(q, spec_nearest(q, centres, kernel.k)).exp()
    assert not torch.allclose(near, ours, atol=1e-3)  # the K cut changes the probabilities


def test_log_space_learns_where_authors_formula_underflows():
    """Far-apart 2048-d features: exp(-d / 2 sigma^2) is 0 in float32 for every centre."""
    g = torch.Generator().manual_seed(0)
    n, d = 40, 2048
    labels = torch.arange(n) % 2
    centres = torch.randn(n, d, generator=g) * 30 + labels.unsqueeze(1) * 0.5
    kernel = NNGKClassifier(num_classes=2, sigma=10.0, k=10)
    kernel.set_centres(centres, labels)
    f = centres[:8].clone().requires_grad_()
    nbrs = kernel.training_neighbours(torch.arange(8))
    # The authors' linear-space formula: every kernel value underflows, the loss is flat.
    dist = ((f.unsqueeze(1) - centres[nbrs]) ** 2).sum(2)
    assert (torch.exp(-dist / (2 * 10.0**2)) == 0).all()
    ref = spec_loop_probs(f, centres, labels, kernel.log_weights, nbrs, 10.0, 2)
    assert torch.allclose(ref, torch.full_like(ref, 0.5))
    # Ours: finite, non-uniform, with a useful gradient; a few steps lower the loss.
    loss0 = kernel(f, labels[:8], torch.arange(8))
    assert torch.isfinite(loss0)
    (grad,) = torch.autograd.grad(loss0, f)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt = torch.optim.SGD([f], lr=5.0)
    for _ in range(20):
        opt.zero_grad()
        loss = kernel(f, labels[:8], torch.arange(8))
        loss.backward()
        opt.step()
    assert loss.item() < loss0.item() - 0.05


def test_tiny_labelled_set_never_sees_itself():
    centres = torch.tensor([[0.0], [1.0], [5.0]])
    kernel = NNGKClassifier(num_classes=2, sigma=1.0, k=200)
    kernel.set_centres(centres, torch.tensor([0, 0, 1]))
    assert kernel.train_neighbours.shape == (3, 2)
    for i in range(3):
        assert i not in kernel.train_neighbours[i].tolist()
    # A single centre: no neighbours at all, a uniform prediction rather than a crash.
    k1 = NNGKClassifier(num_classes=2, sigma=1.0, k=5)
    k1.set_centres(torch.zeros(1, 3), torch.tensor([0]))
    lp = k1.log_probs(torch.zeros(1, 3), k1.training_neighbours(torch.tensor([0])))
    assert torch.allclose(lp.exp(), torch.tensor([[0.5, 0.5]]))


def test_weights_kept_across_refresh_and_state_dict_roundtrip(setup):
    kernel, centres, labels, _ = setup
    w = kernel.log_weights.detach().clone()
    kernel.set_centres(centres + 0.1, labels)
    assert torch.equal(kernel.log_weights.detach(), w)
    fresh = NNGKClassifier(sigma=2.0, k=15)
    fresh.load_state_dict(kernel.state_dict())
    assert fresh.num_classes == 4
    assert torch.equal(fresh.centres, kernel.centres)
    assert torch.equal(fresh.train_neighbours, kernel.train_neighbours)
    q = torch.randn(5, centres.shape[1])
    assert torch.equal(fresh.predict(q), kernel.predict(q))


def test_bad_arguments():
    with pytest.raises(ConfigError, match="sigma"):
        NNGKClassifier(sigma=-1)
    with pytest.raises(ConfigError, match="K"):
        NNGKClassifier(k=0)
    k = NNGKClassifier(num_classes=2)
    with pytest.raises(DataError, match="num_classes"):
        k.set_centres(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="NaN"):
        k.set_centres(torch.full((3, 2), math.nan), torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="set_centres"):
        NNGKClassifier(num_classes=2).predict(torch.zeros(1, 2))


def test_memory_bank_update_is_applied_after_backward(setup):
    kernel, centres, labels, g = setup
    f = (centres[:4] + 1.0).requires_grad_()
    loss = kernel(f, labels[:4], torch.arange(4))
    kernel.update_centres(torch.arange(4), f.detach(), momentum=0.25)
    loss.backward()  # the pending write must not break this backward pass
    assert f.grad is not None
    expected = 0.25 * centres[:4] + 0.75 * (centres[:4] + 1.0)
    assert torch.allclose(kernel.state_dict()["centres"][:4], expected)
    assert torch.allclose(kernel.centres[4:], centres[4:])


def test_kernel_stays_float32_under_autocast(setup):
    kernel, centres, labels, g = setup
    f = centres[:6] + 0.3
    nbrs = kernel.training_neighbours(torch.arange(6))
    ref = kernel.log_probs(f, nbrs)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = kernel.log_probs(f.bfloat16(), nbrs)
        searched = kernel.neighbours(f)
    assert got.dtype == torch.float32
    assert torch.allclose(got, kernel.log_probs(f.bfloat16().float(), nbrs), atol=1e-6)
    assert torch.equal(searched, kernel.neighbours(f))
    assert torch.allclose(ref, kernel.log_probs(f, nbrs))


@pytest.mark.parametrize("dim", [16, 640])
def test_neighbour_dot_products_match_a_plain_gather(dim):
    """The sampled sparse product (and the gathering fallback) give the dot products
    and input gradients of gathering the centre rows, duplicates included; no gradient
    reaches the centres."""
    from mbdml.kernel import _GatheredDot, _SampledDot

    g = torch.Generator().manual_seed(3)
    n, b, k = 500, 6, 40
    centres = torch.randn(n, dim, generator=g, dtype=torch.float64)
    idx = torch.randint(0, n, (b, k), generator=g)
    idx[0, :5] = idx[0, 5]  # repeated neighbours in one row
    weights = torch.randn(b, k, generator=g, dtype=torch.float64)
    f_ref = torch.randn(b, dim, generator=g, dtype=torch.float64, requires_grad=True)
    ref = (f_ref.unsqueeze(1) * centres[idx]).sum(-1)
    (ref * weights).sum().backward()
    for fn in (_SampledDot, _GatheredDot):
        f = f_ref.detach().clone().requires_grad_()
        out = fn.apply(f, centres, idx)
        (out * weights).sum().backward()
        assert torch.allclose(out, ref, atol=1e-10), fn.__name__
        assert torch.allclose(f.grad, f_ref.grad, atol=1e-10), fn.__name__


def test_loss_on_many_centres_matches_plain_loop():
    """With more centres than 8 K the loss takes the sparse path; it still matches the
    SPEC loop in value and gradient."""
    g = torch.Generator().manual_seed(4)
    n, d, c = 400, 8, 5
    centres = torch.randn(n, d, generator=g) * 2
    labels = torch.arange(n) % c
    kernel = NNGKClassifier(num_classes=c, sigma=2.0, k=10)
    kernel.set_centres(centres, labels)
    f = (centres[:12] + 0.3 * torch.randn(12, d, generator=g)).requires_grad_()
    nbrs = kernel.training_neighbours(torch.arange(12))
    ours = kernel.log_probs(f, nbrs).exp()
    ref = spec_loop_probs(f.double(), centres.double(), labels, kernel.log_weights.double(), nbrs, kernel.sigma, c, floor=kernel.class_floor)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    ours[:, 0].sum().backward()
    f2 = f.detach().double().requires_grad_()
    spec_loop_probs(f2, centres.double(), labels, kernel.log_weights.double(), nbrs, kernel.sigma, c, floor=kernel.class_floor)[:, 0].sum().backward()
    assert torch.allclose(f.grad.double(), f2.grad, atol=1e-5)


def test_sparse_path_probe_works_when_first_used_without_gradients():
    """The first use of the kernel may be an evaluation under no_grad or inference
    mode; the one-time probe must still find the sparse path usable on the CPU."""
    from mbdml import kernel as kernel_module

    for ctx in (torch.no_grad, torch.inference_mode):
        kernel_module._SAMPLED_DOT_PROBED.clear()
        with ctx():
            assert kernel_module.sampled_dot_supported(torch.zeros(4, 3))
    assert not kernel_module.sampled_dot_supported(torch.zeros(4, 3, dtype=torch.float16))


@pytest.mark.parametrize("authors_floor", [True, False])
@pytest.mark.parametrize("path", ["dense", "sampled", "gathered"])
def test_fused_log_probs_gradient_is_exact(path, authors_floor):
    """The closed-form backward of the one-node kernel computation matches finite
    differences in float64 for the embeddings and the kernel weights, with masked
    entries, a class absent from a row, duplicate neighbours and a row with no valid
    neighbour at all (which must come out uniform, without NaN)."""
    from mbdml.kernel import _KernelLogProbs

    g = torch.Generator().manual_seed(5)
    n, d, b, k, c = 60, 6, 5, 9, 4
    centres = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c - 1, (n,), generator=g)  # class c - 1 never present
    idx = torch.randint(0, n, (b, k), generator=g)
    idx[1, :3] = idx[1, 3]
    valid = torch.rand(b, k, generator=g) > 0.3
    valid[2] = False
    f = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    theta = (0.3 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    args = (centres, centres.pow(2).sum(1), labels, idx, valid, 0.4, math.log(1e-10), c, path, authors_floor)

    def fn(f, theta):
        return _KernelLogProbs.apply(f, theta, *args)

    out = fn(f, theta)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[2], torch.full((c,), -math.log(c), dtype=torch.float64))
    assert torch.allclose(out.exp().sum(1), torch.ones(b, dtype=torch.float64))
    assert torch.autograd.gradcheck(fn, (f, theta), eps=1e-6, atol=1e-6)
    out[:, 0].sum().backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(theta.grad).all()


# ------------------------------------------------------------ the class floor
def floor_case(dtype=torch.float64):
    """Centres of 4 classes; rows whose neighbour lists miss some classes (the true
    class of row 1, the partner class of rows 2-3) or hold every class (row 0)."""
    g = torch.Generator().manual_seed(11)
    n, d, c = 40, 5, 4
    centres = (torch.randn(n, d, generator=g, dtype=dtype) * 1.5).to(dtype)
    labels = torch.arange(n) % c
    theta = 0.3 * torch.randn(n, generator=g, dtype=dtype)
    by_class = [torch.nonzero(labels == k).flatten() for k in range(c)]
    nbrs = torch.stack([
        torch.cat([by_class[0][:3], by_class[1][:3], by_class[2][:2], by_class[3][:2]]),  # every class
        torch.cat([by_class[1][:5], by_class[2][:5]]),  # true class 0 absent
        torch.cat([by_class[2][:8], by_class[2][8:10]]),  # only class 2: partner classes absent
        torch.cat([by_class[3][:6], by_class[0][:4]]),
    ])
    f = centres[nbrs[:, 0]] + 0.7 * torch.randn(4, d, generator=g, dtype=dtype)
    return centres, labels, theta, nbrs, f, c


def kernel_for(centres, labels, theta, floor, sigma=1.5):
    kernel = NNGKClassifier(num_classes=int(labels.max()) + 1, sigma=sigma, k=10, class_floor=floor)
    kernel.set_centres(centres, labels, train_neighbours=False)
    with torch.no_grad():
        kernel.log_weights.copy_(theta.float())
    return kernel


def test_authors_floor_equals_the_authors_classifier_values_and_gradients():
    """Against a transcription of the authors' per-sample loop (linear space, their
    order of operations), in float64: log-probabilities, and the gradients of an NLL
    on the embeddings and the kernel weights, including rows whose true class or
    mixup partner class has no neighbour in the list."""
    from spec_reference import authors_classifier_log_probs

    centres, labels, theta, nbrs, f0, c = floor_case()
    kernel = kernel_for(centres, labels, theta, "authors").double()
    kernel.centres = centres.clone()  # exactly the float64 centres
    with torch.no_grad():
        kernel.log_weights.copy_(theta)
    y_true = torch.tensor([0, 0, 2, 3])  # row 1's true class is absent from its list
    y_partner = torch.tensor([1, 2, 0, 1])  # rows 2 and 3: partner class absent
    lam = 0.6

    def loss_of(log_p):
        nll = torch.nn.functional.nll_loss
        return lam * nll(log_p, y_true) + (1 - lam) * nll(log_p, y_partner)

    f = f0.clone().requires_grad_()
    ours = kernel.log_probs(f, nbrs)
    g_f, g_w = torch.autograd.grad(loss_of(ours), [f, kernel.log_weights])

    f_ref = f0.clone().requires_grad_()
    w_ref = theta.clone().requires_grad_()
    ref = authors_classifier_log_probs(f_ref, centres, labels, w_ref, nbrs, 1.5, c)
    r_f, r_w = torch.autograd.grad(loss_of(ref), [f_ref, w_ref])
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-9)
    assert torch.allclose(g_f, r_f, atol=1e-9, rtol=1e-7)
    assert torch.allclose(g_w, r_w, atol=1e-9, rtol=1e-7)
    # Row 1's absent true class: NLL = -log 1e-10 + log(S + 2e-10), S its total mass.
    d = ((f0[1] - centres[nbrs[1]]) ** 2).sum(1)
    total = (theta[nbrs[1]].exp() * torch.exp(-d / (2 * 1.5**2))).sum()
    assert (-ours[1, 0]).item() == pytest.approx(-math.log(1e-10) + math.log(total.item() + 2e-10), rel=1e-9)
    # The SPEC restatement of §2 agrees too.
    spec = spec_loop_probs(f0, centres, labels, theta, nbrs, 1.5, c, floor="authors")
    assert torch.allclose(ours.exp(), spec, atol=1e-12)


def test_authors_floor_in_float32_on_the_training_paths():
    """The float32 computation a run uses (dense and sparse dot paths) matches the
    authors' formula evaluated in float64 to float tolerance."""
    from spec_reference import authors_classifier_log_probs

    centres, labels, theta, nbrs, f0, c = floor_case()
    ref = authors_classifier_log_probs(f0, centres, labels, theta, nbrs, 1.5, c)
    kernel = kernel_for(centres.float(), labels, theta, "authors")
    many = torch.cat([centres.float(), 50 + torch.randn(400, centres.shape[1])])  # > 8 K centres: sparse path
    big = kernel_for(many, torch.cat([labels, torch.zeros(400, dtype=torch.long)]), torch.cat([theta, torch.zeros(400, dtype=theta.dtype)]), "authors")
    for k in (kernel, big):
        got = k.log_probs(f0.float(), nbrs)
        assert torch.allclose(got.double(), ref, atol=2e-4, rtol=1e-5)


def test_normalised_floor_differs_where_a_class_is_absent():
    """The two floors agree on a row that holds every class; where the partner class is
    absent, the normalised floor gives it a constant (no gradient) and the authors'
    floor the NLL 23.03 + log S with a gradient that lowers S."""
    centres, labels, theta, nbrs, f0, c = floor_case()
    authors = kernel_for(centres.float(), labels, theta, "authors")
    normalised = kernel_for(centres.float(), labels, theta, "normalised")
    f = f0.float()
    a, n = authors.log_probs(f, nbrs), normalised.log_probs(f, nbrs)
    assert torch.allclose(a[0], n[0], atol=1e-5)  # every class present
    # Row 2 holds class 2 only: its partner class 0 is absent.
    fa = f[2:3].clone().requires_grad_()
    fn = f[2:3].clone().requires_grad_()
    nll_a = -authors.log_probs(fa, nbrs[2:3])[0, 0]
    nll_n = -normalised.log_probs(fn, nbrs[2:3])[0, 0]
    ga, gwa = torch.autograd.grad(nll_a, [fa, authors.log_weights])
    gn, gwn = torch.autograd.grad(nll_n, [fn, normalised.log_weights])
    total_mass = torch.logsumexp(
        torch.log(torch.exp(theta[nbrs[2]].float())) - ((f[2] - centres.float()[nbrs[2]]) ** 2).sum(1) / (2 * 1.5**2), 0)
    assert nll_n.item() == pytest.approx(-math.log(1e-10 / (1 + 3e-10)), rel=1e-5)
    assert nll_a.item() == pytest.approx(-math.log(1e-10) + float(total_mass), rel=1e-4)
    assert float(gn.abs().sum()) == 0.0 and float(gwn.abs().sum()) == 0.0
    assert float(ga.norm()) > 1e-3 and float(gwa.norm()) > 1e-3
    # Its gradient step lowers the total mass: f moves away from its neighbours.
    with torch.no_grad():
        moved = fa - 0.01 * ga
    d_before = ((f[2] - centres.float()[nbrs[2]]) ** 2).sum(1).mean()
    d_after = ((moved[0] - centres.float()[nbrs[2]]) ** 2).sum(1).mean()
    assert d_after > d_before


def test_authors_floor_stays_finite_where_their_formula_underflows():
    """Far-apart 2048-d features: in linear space every kernel value is 0, every class
    gets 1e-10 and the loss is flat; in log space the authors' floor keeps an order
    among the present classes and a gradient."""
    from spec_reference import authors_classifier_log_probs

    g = torch.Generator().manual_seed(0)
    n, d = 40, 2048
    labels = torch.arange(n) % 3
    centres = torch.randn(n, d, generator=g) * 30
    kernel = NNGKClassifier(num_classes=3, sigma=10.0, k=10, class_floor="authors")
    kernel.set_centres(centres, labels)
    f = (torch.randn(6, d, generator=g) * 30).requires_grad_()
    nbrs = kernel.neighbours(f)
    ref = authors_classifier_log_probs(f.detach(), centres, labels, kernel.log_weights.detach(), nbrs, 10.0, 3)
    assert torch.allclose(ref, torch.full_like(ref, -math.log(3)))  # flat
    out = kernel.log_probs(f, nbrs)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(-out[:, 0].sum(), f)
    assert torch.isfinite(grad).all()


def test_unknown_class_floor_is_refused():
    with pytest.raises(ConfigError, match="class_floor"):
        NNGKClassifier(class_floor="after")
