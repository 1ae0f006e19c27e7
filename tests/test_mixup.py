import pytest
import torch
import torch.nn.functional as F

from mbdml.errors import ConfigError
from mbdml.mixup import MixupLoss, mix, mixed_loss, mixup_batch, sample_lambda


@pytest.mark.parametrize("alpha", [0.4, 1.0, 2.0])
def test_lambda_follows_beta_distribution(alpha):
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_lambda(alpha, g) for _ in range(4000)])
    mean, var = 0.5, 1.0 / (4 * (2 * alpha + 1))  # Beta(a, a)
    assert ((draws >= 0) & (draws <= 1)).all()
    assert draws.mean().item() == pytest.approx(mean, abs=0.02)
    assert draws.var().item() == pytest.approx(var, rel=0.1)


def test_alpha_zero_means_no_mixing_and_negative_refused():
    assert sample_lambda(0.0) == 1.0
    x = torch.randn(6, 3)
    mb = mixup_batch(x, torch.arange(6), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(mb.inputs, x) and mb.lam == 1.0
    with pytest.raises(ConfigError, match="alpha"):
        sample_lambda(-1.0)


def test_mix_and_loss_formula_and_reproducibility():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    a, b = mixup_batch(x, y, 1.0, g1), mixup_batch(x, y, 1.0, g2)
    assert a.lam == b.lam and torch.equal(a.permutation, b.permutation)
    p = a.permutation
    assert torch.allclose(a.inputs, a.lam * x + (1 - a.lam) * x[p])
    assert torch.equal(a.labels_b, y[p])
    logits = torch.randn(8, 3)
    expected = a.lam * F.cross_entropy(logits, y) + (1 - a.lam) * F.cross_entropy(logits, y[p])
    assert torch.allclose(mixed_loss(F.cross_entropy, logits, y, y[p], a.lam), expected)
    assert torch.allclose(MixupLoss(torch.nn.CrossEntropyLoss())(logits, y, y[p], a.lam), expected)
    assert torch.equal(mix(x, 1.0, p), x)
