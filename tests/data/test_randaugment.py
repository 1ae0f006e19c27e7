"""RandAugment on whole batches: each operation against PIL or a plain definition, and the batch's draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from mbdml.data.randaugment import (
    MAX_ENHANCE,
    MAX_TRANSLATE,
    RANDAUGMENT_OPS,
    RandAugment,
    _rotation,
    affine,
    apply_op,
    autocontrast,
    equalize,
    randaugment_batch,
)
from mbdml.errors import ConfigError, DataError


def images(b: int = 8, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def smooth_images(b: int = 4, h: int = 16, w: int = 16) -> torch.Tensor:
    """Images with large flat and graded areas, closer to photographs than noise."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 127 / (h + w - 2) + 64])
    return torch.stack([(base * (0.4 + 0.15 * i)).clamp(0, 255) for i in range(b)]).round().to(torch.uint8)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


def one(name: str, x: torch.Tensor, magnitude: float, negative: bool = False, fill: tuple[float, ...] = (127.5,)) -> torch.Tensor:
    b = x.shape[0]
    return apply_op(name, x.float(), torch.full((b,), magnitude), torch.full((b,), negative), fill)


@pytest.mark.parametrize("name", [n for n in RANDAUGMENT_OPS if n not in ("autocontrast", "equalize")])
def test_every_operation_at_magnitude_zero_leaves_the_image(name: str) -> None:
    x = images()
    torch.testing.assert_close(one(name, x, 0.0), x.float(), atol=0.01, rtol=0)


@pytest.mark.parametrize("factor", [0.28, 1.63])
@pytest.mark.parametrize("name,enhancer", [("brightness", ImageEnhance.Brightness), ("color", ImageEnhance.Color),
                                           ("contrast", ImageEnhance.Contrast), ("sharpness", ImageEnhance.Sharpness)])
def test_enhance_operations_match_pil(name: str, enhancer, factor: float) -> None:
    x = smooth_images()
    m, negative = abs(factor - 1) / MAX_ENHANCE, factor < 1
    ours = one(name, x, m, negative)
    for o, img in zip(ours, x):
        want = from_pil(enhancer(to_pil(img)).enhance(factor))
        # PIL rounds its grey image and the contrast mean to integers, and its result to uint8
        assert (o - want).abs().max() <= 3, name


@pytest.mark.parametrize("magnitude", [0.3, 1.0])
def test_solarize_and_posterize_match_pil(magnitude: float) -> None:
    x = images()
    sol, post = one("solarize", x, magnitude), one("posterize", x, magnitude)
    threshold = int(256 * (1 - magnitude))
    bits = 8 - round(magnitude * 4)
    for s, p, img in zip(sol, post, x):
        assert torch.equal(s, from_pil(ImageOps.solarize(to_pil(img), threshold)))
        assert torch.equal(p, from_pil(ImageOps.posterize(to_pil(img), bits)))


def test_rotation_by_half_a_turn_flips_both_axes_of_an_oblong_image() -> None:
    # the aspect correction of the normalised coordinates: exact only if it is right
    x = images(3, h=6, w=10).float()
    out = affine(x, _rotation(torch.full((3,), 180.0), 6, 10), torch.zeros(1, 3, 1, 1))
    torch.testing.assert_close(out, x.flip(2, 3), atol=1e-3, rtol=0)


def test_rotation_by_a_quarter_turn_is_rot90() -> None:
    x = images(2, h=8, w=8).float()
    out = affine(x, _rotation(torch.full((2,), 90.0), 8, 8), torch.zeros(1, 3, 1, 1))
    turned = [torch.rot90(x, k, dims=(2, 3)) for k in (1, -1)]
    assert any(torch.allclose(out, t, atol=1e-3) for t in turned)


@pytest.mark.parametrize("name,dim", [("translate_x", 3), ("translate_y", 2)])
def test_translation_shifts_by_whole_pixels_and_fills_the_edge(name: str, dim: int) -> None:
    x = images(2, h=20, w=20).float()
    shift = 3
    m = shift / (MAX_TRANSLATE * 20)
    fill = (10.0, 20.0, 30.0)
    out = one(name, x, m, negative=False, fill=fill)
    # a positive matrix offset samples further along the axis: the content moves back by `shift`
    kept = out.narrow(dim, 0, 20 - shift)
    torch.testing.assert_close(kept, x.narrow(dim, shift, 20 - shift), atol=1e-3, rtol=0)
    edge = out.narrow(dim, 20 - shift, shift)
    torch.testing.assert_close(edge, torch.tensor(fill).view(1, 3, 1, 1).expand_as(edge), atol=1e-3, rtol=0)


def test_equalize_spreads_equally_frequent_values_evenly_and_keeps_flat_channels() -> None:
    x = torch.tensor([10.0, 20.0, 30.0, 40.0]).repeat(16).view(1, 1, 8, 8)
    out = equalize(torch.cat([x, torch.full_like(x, 77.0)], 1))
    assert sorted(set(out[0, 0].flatten().tolist())) == [0.0, 85.0, 170.0, 255.0]
    assert torch.all(out[0, 0][x[0, 0] == 30.0] == 170.0)  # the order of the values is kept
    assert torch.all(out[0, 1] == 77.0)


def test_autocontrast_stretches_each_channel_to_the_full_range() -> None:
    x = (images(4).float() * 0.5 + 40).round()
    out = autocontrast(x)
    assert torch.all(out.amin((2, 3)) == 0) and torch.all(out.amax((2, 3)) == 255)
    for o, img in zip(out, x.to(torch.uint8)):
        assert (o - from_pil(ImageOps.autocontrast(to_pil(img)))).abs().max() <= 1


def test_randaugment_batch_is_float_in_range_reproducible_and_leaves_its_input() -> None:
    x = images(64)
    before = x.clone()
    a = randaugment_batch(x, RandAugment(), torch.Generator().manual_seed(3))
    b = randaugment_batch(x, RandAugment(), torch.Generator().manual_seed(3))
    c = randaugment_batch(x, RandAugment(), torch.Generator().manual_seed(4))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 255
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)
    changed = (a != x.float()).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # nearly every image: cutout alone changes each one


def test_randaugment_without_operations_or_cutout_is_the_image() -> None:
    x = images()
    out = randaugment_batch(x, RandAugment(num_ops=0, cutout_fraction=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, x.float())


def test_randaugment_cutout_fills_one_square_of_half_the_side() -> None:
    x = torch.zeros(32, 3, 16, 16, dtype=torch.uint8)
    out = randaugment_batch(x, RandAugment(num_ops=0, fill=(200.0,)), torch.Generator().manual_seed(0))
    area = (out == 200).all(1).flatten(1).sum(1)
    assert area.max() == 64 and area.min() >= 16  # an 8x8 square, clipped by the border at worst to 4x4


def test_randaugment_leaves_about_one_image_in_fourteen_as_it_was() -> None:
    # 14 operations, one per image and round: identity (1 in 14) and the smallest magnitudes of the
    # others leave an image as it was; a draw stuck on one operation, or never on identity, would not
    x = smooth_images(4).repeat(250, 1, 1, 1)
    out = randaugment_batch(x, RandAugment(num_ops=1, magnitude=1.0, cutout_fraction=0.0), torch.Generator().manual_seed(0))
    unchanged = ((out - x.float()).abs().flatten(1).amax(1) < 0.5).float().mean().item()
    # identity, and the small magnitudes of the others, leave an image: about 1/14 and a little more
    assert 0.04 < unchanged < 0.2


def test_bad_settings_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="--randaugment_ops"):
        RandAugment(num_ops=-1)
    with pytest.raises(ConfigError, match="--randaugment_magnitude"):
        RandAugment(magnitude=1.5)
    with pytest.raises(ConfigError, match="not known"):
        apply_op("warp", images().float(), torch.zeros(8), torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ConfigError, match="one value or 3"):
        randaugment_batch(images(), RandAugment(fill=(1.0, 2.0)), None)
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        randaugment_batch(torch.zeros(3, 8, 8), RandAugment(), None)
