"""The mixed-sample neighbour rules against plain per-sample loops written from SPEC
§2-4, alone and inside MbDML2, MbDML3 and mbdml_semi."""

import pytest
import torch
from torch import nn

from mbdml.errors import ConfigError
from mbdml.kernel import NNGKClassifier
from mbdml.methods import MIXED_NEIGHBOURS, MethodOptions, MixedNeighbourLists, MixedNeighbourRule, PseudoBatch, build_method, mixed_neighbour_rule
from mbdml.mixup import mixup_batch, sample_lambda

from spec_reference import spec_loop_probs, spec_nearest

C, D, K, N = 3, 6, 8, 30


def problem(class_floor="normalised"):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, D)
    x = torch.randn(N, 5, generator=g)
    y = torch.arange(N) % C
    kernel = NNGKClassifier(num_classes=C, sigma=1.0, k=K, class_floor=class_floor)
    with torch.no_grad():
        kernel.set_centres(model(x), y)
        kernel.log_weights.normal_(0, 0.2, generator=g)
    return model, kernel, x, y


def spec_list(rule, kernel, f_mixed, i, partner):
    """Mixed sample i's neighbours, a plain list: SPEC §4's N_i ("sample"), the two
    source images' lists joined ("union") or the K nearest centres of the mixed
    embedding ("search"); never a source image's own centre, no centre twice."""
    own = kernel.train_neighbours
    if rule == "sample":
        return own[i].tolist()
    if rule == "union":
        return sorted((set(own[i].tolist()) | set(own[partner].tolist())) - {i, partner})
    d = ((kernel.centres - f_mixed) ** 2).sum(1)
    d[[i, partner]] = float("inf")
    return d.argsort()[:K].tolist()


def used(lists: MixedNeighbourLists, row: int) -> list[int]:
    nbrs = lists.neighbours[row]
    return nbrs.tolist() if lists.valid is None else nbrs[lists.valid[row]].tolist()


def nll(f, label, kernel, neighbours):
    """SPEC §2: -log P(label | f) with the given neighbour list, one sample."""
    p = spec_loop_probs(
        f.double()[None], kernel.centres.double(), kernel.centre_labels, kernel.log_weights.double(), [torch.tensor(neighbours)], kernel.sigma, C, floor=kernel.class_floor
    )
    return -torch.log(p[0, label])


@pytest.mark.parametrize("rule", MIXED_NEIGHBOURS)
def test_rule_gives_each_mixed_pair_its_spec_list(rule):
    model, kernel, x, y = problem()
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:12]
    mixed = mixup_batch(x[idx], y[idx], 1.0, torch.Generator().manual_seed(2))
    with torch.no_grad():
        fm = model(mixed.inputs)
    lists = mixed_neighbour_rule(rule)(kernel, fm, idx, mixed.permutation)
    for r in range(12):
        i, partner = int(idx[r]), int(idx[mixed.permutation[r]])
        expected = spec_list(rule, kernel, fm[r], i, partner)
        assert sorted(used(lists, r)) == sorted(expected)
        assert len(used(lists, r)) == len(set(used(lists, r)))


@pytest.mark.parametrize("rule", MIXED_NEIGHBOURS)
def test_rule_with_a_pseudo_labelled_partner(rule):
    """A pseudo-labelled partner has no centre; its list is the search made when it was
    labelled. "sample" keeps N_i; "union" and "search" join the two lists without the
    labelled image's own centre."""
    model, kernel, x, y = problem()
    idx = torch.arange(6)
    with torch.no_grad():
        pseudo_nbrs = kernel.neighbours(model(torch.randn(6, 5, generator=torch.Generator().manual_seed(3))))
    lists = mixed_neighbour_rule(rule).with_pseudo_labelled(kernel, idx, pseudo_nbrs)
    for i in range(6):
        own = kernel.train_neighbours[i].tolist()
        expected = own if rule == "sample" else sorted((set(own) | set(pseudo_nbrs[i].tolist())) - {i})
        assert sorted(used(lists, i)) == sorted(expected)


@pytest.mark.parametrize("name", ["mbdml2", "mbdml3"])
@pytest.mark.parametrize("rule", MIXED_NEIGHBOURS)
@pytest.mark.parametrize("floor", ["normalised", "authors"])
def test_mixed_nngk_loss_is_the_spec_loop_with_each_rule(name, rule, floor):
    """s [lam NLL(G(f(x~), L_i), y_i) + (1 - lam) NLL(G(f(x~), L_i), y_p(i))] (+ b NNGK(x)
    for MbDML3), L_i the rule's list, written one sample at a time."""
    s, b = 0.7, 1.3
    model, kernel, x, y = problem(floor)
    method = build_method(name, kernel, D, C, MethodOptions(scale_mixup=s, beta=b, mixed_neighbours=rule))
    idx = torch.arange(10, 22)
    out = method(model, x[idx], y[idx], idx, torch.Generator().manual_seed(3))
    mixed = mixup_batch(x[idx], y[idx], 1.0, torch.Generator().manual_seed(3))  # the same draw
    lam, perm = mixed.lam, mixed.permutation
    fm, f = model(mixed.inputs), model(x[idx])
    term, clean = 0.0, 0.0
    for r in range(12):
        i, partner = int(idx[r]), int(idx[perm[r]])
        lst = spec_list(rule, kernel, fm[r].detach(), i, partner)
        term = term + lam * nll(fm[r], y[i], kernel, lst) + (1 - lam) * nll(fm[r], y[partner], kernel, lst)
        clean = clean + nll(f[r], y[i], kernel, kernel.train_neighbours[i].tolist())
    expected = s * term / 12 + (b * clean / 12 if name == "mbdml3" else 0.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("rule", MIXED_NEIGHBOURS)
@pytest.mark.parametrize("floor", ["normalised", "authors"])
def test_semi_mixed_term_is_the_spec_loop_with_each_rule(rule, floor):
    """mbdml_semi's mixed term with a pseudo-labelled partner u_i, one sample at a time."""
    s, b, w = 0.7, 1.3, 0.4
    model, kernel, x, y = problem(floor)
    method = build_method("mbdml_semi", kernel, D, C, MethodOptions(scale_mixup=s, beta=b, pseudo_weight=w, mixed_neighbours=rule))
    g = torch.Generator().manual_seed(8)
    u = torch.randn(6, 5, generator=g)
    y_u = torch.randint(0, C, (6,), generator=g)
    with torch.no_grad():
        nb_u = kernel.neighbours(model(u))
    out = method(model, x[:6], y[:6], torch.arange(6), torch.Generator().manual_seed(4), pseudo=PseudoBatch(u, y_u, nb_u))
    lam = sample_lambda(1.0, torch.Generator().manual_seed(4))
    fm, f, fu = model(lam * x[:6] + (1 - lam) * u), model(x[:6]), model(u)
    total = 0.0
    for i in range(6):
        own = kernel.train_neighbours[i].tolist()
        lst = own if rule == "sample" else sorted((set(own) | set(nb_u[i].tolist())) - {i})
        mixed = lam * nll(fm[i], y[i], kernel, lst) + (1 - lam) * nll(fm[i], y_u[i], kernel, lst)
        total = total + b * nll(f[i], y[i], kernel, own) + w * nll(fu[i], y_u[i], kernel, nb_u[i].tolist()) + s * mixed
    assert out.loss.item() == pytest.approx((total / 6).item(), rel=1e-5)


def test_a_method_asks_its_rule():
    """The rule is a seam: a method uses whatever rule it holds, here every centre."""

    class EveryCentre(MixedNeighbourRule):
        name = "every"

        def __call__(self, kernel, embeddings, indices, permutation):
            return MixedNeighbourLists(torch.arange(kernel.num_centres).expand(indices.shape[0], -1))

    model, kernel, x, y = problem()
    method = build_method("mbdml2", kernel, D, C, MethodOptions(scale_mixup=1.0))
    method.mixed_neighbour_rule = EveryCentre()
    idx = torch.arange(8)
    out = method(model, x[idx], y[idx], idx, torch.Generator().manual_seed(5))
    mixed = mixup_batch(x[idx], y[idx], 1.0, torch.Generator().manual_seed(5))
    fm = model(mixed.inputs)
    every = list(range(N))
    terms = [mixed.lam * nll(fm[r], y[r], kernel, every) + (1 - mixed.lam) * nll(fm[r], y[mixed.permutation[r]], kernel, every) for r in range(8)]
    assert out.loss.item() == pytest.approx((sum(terms) / 8).item(), rel=1e-5)
    assert out.parts["mixed_class_absent"].item() == 0.0  # every class is among all the centres


def test_unknown_rule_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="unknown mixed-sample neighbour rule 'nearest'; choose one of sample, union, search"):
        mixed_neighbour_rule("nearest")
    with pytest.raises(ConfigError, match="choose one of sample, union, search"):
        MethodOptions(mixed_neighbours="nearest")
