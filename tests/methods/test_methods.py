"""Each method's loss against its formula in SPEC.md §4, and a learning check."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbdml.errors import ConfigError
from mbdml.kernel import NNGKClassifier
from mbdml.methods import BASELINES, METHODS, MethodOptions, build_method, class_absent_share
from mbdml.mixup import mixup_batch

from spec_reference import spec_loop_probs

NUM_CLASSES, DIM = 3, 6


def make(name, **opts):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, DIM)
    x = torch.randn(30, 5, generator=g)
    y = torch.arange(30) % NUM_CLASSES
    kernel = NNGKClassifier(num_classes=NUM_CLASSES, sigma=1.0, k=8)
    with torch.no_grad():
        kernel.set_centres(model(x), y)
        kernel.log_weights.normal_(0, 0.2, generator=g)
    method = build_method(name, kernel, DIM, NUM_CLASSES, MethodOptions(**opts))
    return method, model, x, y, kernel


def same_class_lists(y, k=8):
    """Each sample's list: k other samples of its own class, as after training has
    separated the classes."""
    return torch.tensor([[j for j in range(len(y)) if y[j] == y[i] and j != i][:k] for i in range(len(y))])


def nll_spec(f, y, kernel, nbrs):
    p = spec_loop_probs(f.double(), kernel.centres.double(), kernel.centre_labels, kernel.log_weights.double(), nbrs, kernel.sigma, NUM_CLASSES, floor=kernel.class_floor)
    return -torch.log(p[torch.arange(len(y)), y]).mean()


def test_nngk_loss_is_spec_nll():
    method, model, x, y, kernel = make("nngk")
    idx = torch.arange(10)
    out = method(model, x[:10], y[:10], idx)
    ref = nll_spec(model(x[:10]), y[:10], kernel, kernel.train_neighbours[idx])
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["mbdml1", "mbdml2", "mbdml3", "mixup"])
def test_mixup_methods_match_their_formula(name):
    s, b = 0.7, 1.3
    method, model, x, y, kernel = make(name, scale_mixup=s, beta=b, alpha=1.0)
    idx = torch.arange(12)
    xb, yb = x[:12], y[:12]
    out = method(model, xb, yb, idx, torch.Generator().manual_seed(3))
    mixed = mixup_batch(xb, yb, 1.0, torch.Generator().manual_seed(3))  # the same draw
    lam, p = mixed.lam, mixed.permutation
    f, fm = model(xb), model(mixed.inputs)
    nbrs = kernel.train_neighbours[idx]
    clean = nll_spec(f, yb, kernel, nbrs)
    mixed_nngk = lam * nll_spec(fm, yb, kernel, nbrs) + (1 - lam) * nll_spec(fm, yb[p], kernel, nbrs)
    if name in ("mixup", "mbdml1"):
        logits = method.head(fm)
        ce = lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[p])
    expected = {
        "mixup": s * ce if name == "mixup" else None,
        "mbdml1": b * clean + s * ce if name == "mbdml1" else None,
        "mbdml2": s * mixed_nngk,
        "mbdml3": b * clean + s * mixed_nngk,
    }[name]
    assert out.loss.item() == pytest.approx(float(expected.detach()), rel=1e-5)


@pytest.mark.parametrize("name", ["mbdml1", "mbdml3"])
def test_split_batch_puts_the_clean_term_on_one_half_and_mixes_the_other(name):
    s, b = 0.7, 1.3
    method, model, x, y, kernel = make(name, scale_mixup=s, beta=b, alpha=1.0, split_batch=True)
    idx = torch.arange(12)
    xb, yb = x[:12], y[:12]
    seen = []
    counting = lambda inp: (seen.append(inp.shape[0]), model(inp))[1]  # noqa: E731
    out = method(counting, xb, yb, idx, torch.Generator().manual_seed(3))
    assert seen == [12]  # one pass: 6 clean and 6 mixed images
    mixed = mixup_batch(xb[6:], yb[6:], 1.0, torch.Generator().manual_seed(3))  # the same draw, second half only
    lam, p = mixed.lam, mixed.permutation
    y2, fm = yb[6:], model(mixed.inputs)
    clean = nll_spec(model(xb[:6]), yb[:6], kernel, kernel.train_neighbours[idx[:6]])
    if name == "mbdml1":
        logits = method.head(fm)
        term = lam * F.cross_entropy(logits, y2) + (1 - lam) * F.cross_entropy(logits, y2[p])
    else:  # the mixed samples use their own (second-half) neighbour lists
        nbrs = kernel.train_neighbours[idx[6:]]
        term = lam * nll_spec(fm, y2, kernel, nbrs) + (1 - lam) * nll_spec(fm, y2[p], kernel, nbrs)
    assert out.loss.item() == pytest.approx(float((b * clean + s * term).detach()), rel=1e-5)
    assert torch.equal(out.targets, yb[:6])


def test_alpha_zero_turns_mbdml2_into_scaled_nngk():
    method, model, x, y, kernel = make("mbdml2", alpha=0.0, scale_mixup=2.0)
    idx = torch.arange(9)
    out = method(model, x[:9], y[:9], idx, torch.Generator().manual_seed(0))
    ref = nll_spec(model(x[:9]), y[:9], kernel, kernel.train_neighbours[idx])
    assert out.loss.item() == pytest.approx(2.0 * ref.item(), rel=1e-5)


@pytest.mark.parametrize("rule", ["union", "search"])
def test_mixed_neighbour_rules_never_use_either_source_centre(rule):
    method, model, x, y, kernel = make("mbdml2", mixed_neighbours=rule)
    idx = torch.arange(12)
    mixed = mixup_batch(x[:12], y[:12], 1.0, torch.Generator().manual_seed(1))
    lists = method.mixed_neighbour_rule(kernel, model(mixed.inputs), idx, mixed.permutation)
    nbrs = lists.neighbours
    valid = torch.ones_like(nbrs, dtype=torch.bool) if lists.valid is None else lists.valid
    for i in range(12):
        used = nbrs[i][valid[i]].tolist()
        assert i not in used and int(mixed.permutation[i]) not in used
        assert len(used) == len(set(used))  # no centre counted twice


def test_class_absent_share_counts_pairs_missing_either_class():
    centre_labels = torch.tensor([0, 0, 1, 1, 2])
    nbrs = torch.tensor([[0, 1], [2, 3], [0, 2]])
    a, b = torch.tensor([0, 1, 0]), torch.tensor([1, 1, 2])
    # row 0 lacks class 1, row 1 has class 1 (a = b), row 2 lacks class 2
    assert class_absent_share(centre_labels, nbrs, None, a, b).item() == pytest.approx(2 / 3)
    valid = torch.tensor([[True, True], [False, False], [True, True]])  # row 1's list is empty
    assert class_absent_share(centre_labels, nbrs, valid, a, b).item() == pytest.approx(1.0)


@pytest.mark.parametrize("rule", ["sample", "union"])
def test_mbdml3_logs_mixed_pairs_whose_list_lacks_a_class(rule):
    """Pure lists (every neighbour of the sample's own class), as after training has
    separated the classes: the authors' list lacks the partner's class for every pair
    of two classes; the union of both lists never does."""
    method, model, x, y, kernel = make("mbdml3", mixed_neighbours=rule)
    kernel.train_neighbours = same_class_lists(y)
    g = torch.Generator().manual_seed(3)
    out = method(model, x, y, torch.arange(30), g)
    mixed = mixup_batch(x, y, 1.0, torch.Generator().manual_seed(3))
    differ = (mixed.labels_a != mixed.labels_b).float().mean().item()
    assert 0 < differ < 1
    expected = differ if rule == "sample" else 0.0
    assert out.parts["mixed_class_absent"].item() == pytest.approx(expected)


def test_authors_feature_head_needs_enough_dimensions():
    kernel = NNGKClassifier(num_classes=10)
    with pytest.raises(ConfigError, match="mixup_head"):
        build_method("mbdml1", kernel, 4, 10, MethodOptions(mixup_head="features"))
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("arcface", kernel, 4, 10)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_lowers_its_loss(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % NUM_CLASSES
    x = torch.randn(60, 5, generator=g) + 2.0 * F.one_hot(y, 5).float()
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, DIM))
    kernel = NNGKClassifier(num_classes=NUM_CLASSES, sigma=1.0, k=10)
    method = build_method(name, kernel, DIM, NUM_CLASSES, MethodOptions(alpha=0.0 if name in BASELINES else 1.0))
    with torch.no_grad():
        kernel.set_centres(model(x), y)
    params = [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)

    def epoch_loss(step: bool) -> float:
        gen = torch.Generator().manual_seed(7)
        total = 0.0
        for i in range(0, 60, 20):
            idx = torch.arange(i, i + 20)
            out = method(model, x[idx], y[idx], idx, gen)
            total += out.loss.item()
            if step:
                opt.zero_grad()
                out.loss.backward()
                opt.step()
        return total

    before = epoch_loss(False)
    for _ in range(30):
        epoch_loss(True)
    assert epoch_loss(False) < before


def test_label_smoothing_nll_matches_torch_cross_entropy():
    from mbdml.methods import smoothed_nll

    g = torch.Generator().manual_seed(5)
    logits, y = torch.randn(7, 4, generator=g), torch.randint(0, 4, (7,), generator=g)
    for eps in (0.0, 0.1, 0.3):
        assert smoothed_nll(F.log_softmax(logits, 1), y, eps).item() == pytest.approx(F.cross_entropy(logits, y, label_smoothing=eps).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="label_smoothing"):
        MethodOptions(label_smoothing=1.0)


@pytest.mark.parametrize("rule", ["sample", "union"])
def test_semi_supervised_loss_matches_its_formula(rule):
    """b NNGK(x) + w NNGK(u, pseudo labels) + s [lam NLL(x~, y) + (1 - lam) NLL(x~, y_u)], x~ = lam x + (1 - lam) u."""
    from mbdml.methods import PseudoBatch
    from mbdml.mixup import sample_lambda

    s, b, w = 0.7, 1.3, 0.4
    method, model, x, y, kernel = make("mbdml_semi", scale_mixup=s, beta=b, pseudo_weight=w, mixed_neighbours=rule)
    g = torch.Generator().manual_seed(8)
    idx = torch.arange(6)
    u = torch.randn(6, 5, generator=g)
    with torch.no_grad():
        nb_u = kernel.neighbours(model(u))
    y_u = torch.randint(0, NUM_CLASSES, (6,), generator=g)
    out = method(model, x[:6], y[:6], idx, torch.Generator().manual_seed(4), pseudo=PseudoBatch(u, y_u, nb_u))
    lam = sample_lambda(1.0, torch.Generator().manual_seed(4))
    fm = model(lam * x[:6] + (1 - lam) * u)
    own = kernel.train_neighbours[idx]
    if rule == "sample":
        mixed = lam * nll_spec(fm, y[:6], kernel, own) + (1 - lam) * nll_spec(fm, y_u, kernel, own)
    else:  # per sample: the union of both lists without duplicates and without the labelled image's own centre
        terms = []
        for i in range(6):
            used = sorted(set(own[i].tolist()) | set(nb_u[i].tolist()) - {i})
            nb = torch.tensor([used])
            terms.append(lam * nll_spec(fm[i : i + 1], y[i : i + 1], kernel, nb) + (1 - lam) * nll_spec(fm[i : i + 1], y_u[i : i + 1], kernel, nb))
        mixed = torch.stack(terms).mean()
    expected = b * nll_spec(model(x[:6]), y[:6], kernel, own) + w * nll_spec(model(u), y_u, kernel, nb_u) + s * mixed
    assert out.loss.item() == pytest.approx(float(expected.detach()), rel=1e-5)
    assert set(out.parts) >= {"nngk", "pseudo_nngk", "mixup_nngk", "mixed_class_absent"}
    # the share of mixed pairs whose list lacks the labelled or the pseudo-label's class, by a plain loop
    absent = 0
    for i in range(6):
        used = own[i].tolist() if rule == "sample" else sorted(set(own[i].tolist()) | set(nb_u[i].tolist()) - {i})
        present = set(kernel.centre_labels[used].tolist())
        absent += int(y[i]) not in present or int(y_u[i]) not in present
    assert out.parts["mixed_class_absent"].item() == pytest.approx(absent / 6)
    # without pseudo-labelled images it is MbDML3
    plain = method(model, x[:6], y[:6], idx, torch.Generator().manual_seed(4))
    m3 = build_method("mbdml3", kernel, DIM, NUM_CLASSES, MethodOptions(scale_mixup=s, beta=b, mixed_neighbours=rule))
    assert plain.loss.item() == pytest.approx(m3(model, x[:6], y[:6], idx, torch.Generator().manual_seed(4)).loss.item(), rel=1e-6)


def test_mbdml_semi_logs_pairs_whose_list_lacks_the_pseudo_label():
    """With pure lists (as after training has separated the classes), the labelled
    image's own list lacks the pseudo-label's class whenever the two differ."""
    from mbdml.methods import PseudoBatch

    method, model, x, y, kernel = make("mbdml_semi", mixed_neighbours="sample")
    kernel.train_neighbours = same_class_lists(y)
    g = torch.Generator().manual_seed(8)
    u = torch.randn(6, 5, generator=g)
    y_u = torch.tensor([0, 1, 2, 2, 1, 0])  # against y[:6] = 0, 1, 2, 0, 1, 2: two pairs differ
    out = method(model, x[:6], y[:6], torch.arange(6), torch.Generator().manual_seed(4), pseudo=PseudoBatch(u, y_u, kernel.neighbours(model(u))))
    assert out.parts["mixed_class_absent"].item() == pytest.approx(2 / 6)


def _pseudo_batch(model, kernel, n, seed=8):
    from mbdml.methods import PseudoBatch

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 5, generator=g)
    with torch.no_grad():
        nb_u = kernel.neighbours(model(u))
    return PseudoBatch(u, torch.randint(0, NUM_CLASSES, (n,), generator=g), nb_u)


def test_mbdml1_semi_loss_matches_its_formula():
    """b NNGK(x) + w NNGK(u, pseudo labels) + s [lam CE(h(x~), y) + (1 - lam) CE(h(x~), y_u)], x~ = lam x + (1 - lam) u."""
    from mbdml.mixup import sample_lambda

    s, b, w = 0.7, 1.3, 0.4
    method, model, x, y, kernel = make("mbdml1_semi", scale_mixup=s, beta=b, pseudo_weight=w)
    idx = torch.arange(6)
    pb = _pseudo_batch(model, kernel, 6)
    out = method(model, x[:6], y[:6], idx, torch.Generator().manual_seed(4), pseudo=pb)
    lam = sample_lambda(1.0, torch.Generator().manual_seed(4))
    logits = method.head(model(lam * x[:6] + (1 - lam) * pb.images))
    ce = lam * F.cross_entropy(logits, y[:6]) + (1 - lam) * F.cross_entropy(logits, pb.labels)
    own = kernel.train_neighbours[idx]
    expected = b * nll_spec(model(x[:6]), y[:6], kernel, own) + w * nll_spec(model(pb.images), pb.labels, kernel, pb.neighbours) + s * ce
    assert out.loss.item() == pytest.approx(float(expected.detach()), rel=1e-5)
    assert set(out.parts) >= {"nngk", "pseudo_nngk", "mixup_ce"}
    # without pseudo-labelled images it is MbDML1 (same head, same draw)
    plain = method(model, x[:6], y[:6], idx, torch.Generator().manual_seed(4))
    m1 = build_method("mbdml1", kernel, DIM, NUM_CLASSES, MethodOptions(scale_mixup=s, beta=b))
    m1.head.load_state_dict(method.head.state_dict())
    assert plain.loss.item() == pytest.approx(m1(model, x[:6], y[:6], idx, torch.Generator().manual_seed(4)).loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["mbdml_semi", "mbdml1_semi"])
def test_semi_split_batch_has_clean_first_halves_and_mixes_the_second_halves(name):
    from mbdml.mixup import sample_lambda

    s, b, w = 0.7, 1.3, 0.4
    method, model, x, y, kernel = make(name, scale_mixup=s, beta=b, pseudo_weight=w, split_batch=True)
    idx = torch.arange(8)
    pb = _pseudo_batch(model, kernel, 8)
    seen = []
    counting = lambda inp: (seen.append(inp.shape[0]), model(inp))[1]  # noqa: E731
    out = method(counting, x[:8], y[:8], idx, torch.Generator().manual_seed(5), pseudo=pb)
    assert seen == [12]  # 4 clean labelled + 4 clean pseudo-labelled + 4 mixed: 1.5 passes per labelled image
    lam = sample_lambda(1.0, torch.Generator().manual_seed(5))
    fm = model(lam * x[4:8] + (1 - lam) * pb.images[4:])
    if name == "mbdml1_semi":
        logits = method.head(fm)
        term = lam * F.cross_entropy(logits, y[4:8]) + (1 - lam) * F.cross_entropy(logits, pb.labels[4:])
    else:
        own = kernel.train_neighbours[idx[4:]]
        term = lam * nll_spec(fm, y[4:8], kernel, own) + (1 - lam) * nll_spec(fm, pb.labels[4:], kernel, own)
    clean = nll_spec(model(x[:4]), y[:4], kernel, kernel.train_neighbours[idx[:4]])
    clean_u = nll_spec(model(pb.images[:4]), pb.labels[:4], kernel, pb.neighbours[:4])
    assert out.loss.item() == pytest.approx(float((b * clean + w * clean_u + s * term).detach()), rel=1e-5)
    assert torch.equal(out.targets, y[:4])


@pytest.mark.parametrize("name", ["mbdml_semi", "mbdml1_semi"])
@pytest.mark.parametrize("split", [False, True])
def test_semi_pseudo_ratio_pairs_each_mixed_labelled_image_with_ratio_pseudo_labelled_ones(name, split):
    """A pseudo-labelled batch r times the labelled one: every pseudo-labelled image is
    used once, clean or mixed, and each labelled image of the mix is repeated r times."""
    from mbdml.mixup import sample_lambda

    s, b, w, r = 0.7, 1.3, 0.4, 3
    method, model, x, y, kernel = make(name, scale_mixup=s, beta=b, pseudo_weight=w, split_batch=split)
    idx = torch.arange(8)
    pb = _pseudo_batch(model, kernel, 8 * r)
    seen = []
    counting = lambda inp: (seen.append(inp.shape[0]), model(inp))[1]  # noqa: E731
    out = method(counting, x[:8], y[:8], idx, torch.Generator().manual_seed(5), pseudo=pb)
    lam = sample_lambda(1.0, torch.Generator().manual_seed(5))
    if split:  # 4 clean labelled + 12 clean pseudo-labelled + 12 mixed: r + 0.5 passes per labelled image
        assert seen == [4 + 12 + 12]
        cl, mx, cu, mu = slice(0, 4), slice(4, 8), slice(0, 12), slice(12, 24)
    else:  # 8 + 24 + 24: 2r + 1 passes
        assert seen == [8 + 24 + 24]
        cl, mx, cu, mu = slice(0, 8), slice(0, 8), slice(0, 24), slice(0, 24)
    xm, ym, im = x[mx].repeat(r, 1), y[mx].repeat(r), idx[mx].repeat(r)
    fm = model(lam * xm + (1 - lam) * pb.images[mu])
    if name == "mbdml1_semi":
        logits = method.head(fm)
        term = lam * F.cross_entropy(logits, ym) + (1 - lam) * F.cross_entropy(logits, pb.labels[mu])
    else:
        own = kernel.train_neighbours[im]
        term = lam * nll_spec(fm, ym, kernel, own) + (1 - lam) * nll_spec(fm, pb.labels[mu], kernel, own)
    clean = nll_spec(model(x[cl]), y[cl], kernel, kernel.train_neighbours[idx[cl]])
    clean_u = nll_spec(model(pb.images[cu]), pb.labels[cu], kernel, pb.neighbours[cu])
    assert out.loss.item() == pytest.approx(float((b * clean + w * clean_u + s * term).detach()), rel=1e-5)


def test_semi_pseudo_batch_must_be_a_multiple_of_the_labelled_one():
    method, model, x, y, kernel = make("mbdml1_semi")
    with pytest.raises(ValueError, match="whole number of times"):
        method(model, x[:6], y[:6], torch.arange(6), torch.Generator().manual_seed(0), pseudo=_pseudo_batch(model, kernel, 9))


@pytest.mark.parametrize("name", ["nngk", "mbdml1", "mbdml3", "mbdml_semi", "mbdml1_semi"])
def test_centre_momentum_moves_the_centres_after_the_step(name):
    """c_i <- m c_i + (1 - m) f_i for the step's clean images, once the step is over: every
    term of the step (and its backward pass) sees the centres as they were."""
    m = 0.5
    method, model, x, y, kernel = make(name, centre_momentum=m)
    still = copy.deepcopy(method)  # the same head and kernel, centres fixed
    still.options = dataclasses.replace(method.options, centre_momentum=None)
    idx = torch.arange(12)
    before = kernel.centres.clone()
    pseudo = {"pseudo": _pseudo_batch(model, kernel, 12)} if name.endswith("_semi") else {}
    ref = still(model, x[idx], y[idx], idx, torch.Generator().manual_seed(3), **pseudo)
    out = method(model, x[idx], y[idx], idx, torch.Generator().manual_seed(3), **pseudo)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    kernel.training_neighbours(idx)  # the next read applies the move
    with torch.no_grad():
        f = model(x[idx])
    assert torch.allclose(kernel.centres[idx], m * before[idx] + (1 - m) * f, atol=1e-6)
    assert torch.equal(kernel.centres[12:], before[12:])
