"""FrozenFeatureCache: the frozen stages' outputs of fixed images, computed once."""

from __future__ import annotations

import pytest
import torch

from mbdml.evaluate import compute_embeddings
from mbdml.feature_cache import FrozenFeatureCache
from mbdml.models import build_model


def _model(freeze: int = 2):
    torch.manual_seed(0)
    return build_model("resnet_small", 3, embedding_dim=8, width=4, normalize=True, freeze_stages=freeze).eval()


def _images(n: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def _counting(model):
    calls = []
    original = model.frozen_features

    def frozen_features(x):
        calls.append(x.shape[0])
        return original(x)

    model.frozen_features = frozen_features
    return calls


@pytest.mark.parametrize("flip", [False, True])
def test_embeddings_through_the_cache_equal_the_plain_ones_and_are_computed_once(flip):
    model, images = _model(), _images()
    cache = FrozenFeatureCache(model, max_bytes=2**30, batch_size=16)
    calls = _counting(model)
    with torch.no_grad():
        plain = compute_embeddings(model, images, batch_size=16, flip_average=flip)
        first = cache.embed(images, flip_average=flip)
        assert sum(calls) == 50 * (2 if flip else 1)
        again = cache.embed(images, flip_average=flip)
    assert sum(calls) == 50 * (2 if flip else 1)  # the second pass ran only the trainable part
    assert torch.allclose(first, plain, atol=1e-6) and torch.equal(first, again)
    assert cache.used_bytes > 0


def test_the_trainable_part_still_changes_the_result():
    model, images = _model(), _images()
    cache = FrozenFeatureCache(model, max_bytes=2**30)
    before = cache.embed(images)
    with torch.no_grad():
        model.trunk.layer3.block.conv2.weight.mul_(-1.0)  # a training step on an unfrozen stage
    after = cache.embed(images)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, compute_embeddings(model, images), atol=1e-6)


def test_slices_of_one_tensor_are_kept_apart():
    model, images = _model(), _images(60)
    cache = FrozenFeatureCache(model, max_bytes=2**30)
    a, b = cache.embed(images[:30]), cache.embed(images[30:])
    assert torch.allclose(torch.cat([a, b]), compute_embeddings(model, images), atol=1e-6)
    assert torch.equal(cache.embed(images[30:]), b)


def test_a_set_that_does_not_fit_is_left_to_the_caller():
    model, images = _model(), _images()
    per_image = model.frozen_features(torch.zeros(1, 3, 16, 16)).numel() * 4
    cache = FrozenFeatureCache(model, max_bytes=per_image * 60)
    assert cache.embed(images) is not None  # 50 images fit
    assert cache.embed(_images(20, seed=1)) is None  # 20 more do not: nothing kept for them
    assert cache.used_bytes == per_image * 50
    cache.clear()
    assert cache.used_bytes == 0 and cache.embed(_images(20, seed=1)) is not None


def test_off_without_frozen_stages_or_memory_and_cleared_when_the_frozen_stages_change():
    images = _images()
    assert FrozenFeatureCache(_model(0), max_bytes=2**30).embed(images) is None
    assert FrozenFeatureCache(_model(), max_bytes=0).embed(images) is None
    model = _model(2)
    cache = FrozenFeatureCache(model, max_bytes=2**30)
    cache.embed(images)
    model.freeze_stages(1).eval()
    assert torch.allclose(cache.embed(images), compute_embeddings(model, images), atol=1e-6)


def test_feature_batches_cover_the_set_in_order():
    model, images = _model(), _images()
    cache = FrozenFeatureCache(model, max_bytes=2**30, batch_size=16)
    batches = cache.feature_batches(images)
    assert [b.shape[0] for b in batches] == [16, 16, 16, 2]
    with torch.no_grad():
        assert torch.allclose(torch.cat(batches), model.frozen_features((images.float() / 255 - 0.5) / 0.5), atol=1e-5)
    rows = torch.tensor([40, 3, 17])
    chosen = cache.feature_batches(images, rows)
    assert len(chosen) == 1 and torch.equal(chosen[0], torch.cat(batches)[rows])


def test_put_keeps_given_features_within_the_budget_and_peek_never_computes():
    model, images = _model(), _images(20)
    cache = FrozenFeatureCache(model, max_bytes=2**30, batch_size=16)
    calls = _counting(model)
    assert cache.peek(images) is None and calls == []  # nothing kept, nothing computed
    with torch.no_grad():
        given = torch.randn(20, 4, 8, 8)
    assert cache.put(images, given, flipped=given.flip(3))
    assert cache.features(images) is given and torch.equal(cache.peek(images, flipped=True), given.flip(3))
    assert calls == [] and cache.used_bytes == 2 * given.numel() * 4
    assert cache.put(images, given[:5]) is False  # rows that are not these images
    small = FrozenFeatureCache(model, max_bytes=given.numel() * 4 - 1, batch_size=16)
    assert small.put(images, given) is False and small.used_bytes == 0 and small.peek(images) is None
    assert FrozenFeatureCache(model, max_bytes=0).put(images, given) is False  # the cache is off


def test_same_frozen_stages_compares_weights_and_statistics_of_the_frozen_part_only():
    from mbdml.feature_cache import same_frozen_stages

    a, b = _model(), _model()
    assert same_frozen_stages(a, b)
    with torch.no_grad():
        a.head.weight.add_(1.0)  # a trainable layer: the frozen features stay the same
    assert same_frozen_stages(a, b)
    bn = next(m for group in a.frozen_modules for m in group.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.add_(0.1)  # a frozen statistic: not the same features any more
    assert not same_frozen_stages(a, b)
    assert not same_frozen_stages(_model(1), _model(2))
