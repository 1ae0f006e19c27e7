"""Batch augmentation, normalisation and the BatchLoader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mbdml.data import Augmentation, Batch, BatchLoader, augment_batch, normalize_batch
from mbdml.errors import ConfigError, DataError


def images(b: int = 16, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def windows(padded: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    hp, wp = padded.shape[-2:]
    return [padded[:, i : i + h, j : j + w] for i in range(hp - h + 1) for j in range(wp - w + 1)]


# --------------------------------------------------------------------------- augmentation


def test_no_augmentation_is_identity() -> None:
    x = images()
    assert torch.equal(augment_batch(x, Augmentation(), torch.Generator().manual_seed(0)), x)
    assert torch.equal(augment_batch(x, Augmentation(crop_padding=0), None), x)


def test_flip_is_reversed_columns_or_identity() -> None:
    x = images(64)
    out = augment_batch(x, Augmentation(flip=True), torch.Generator().manual_seed(1))
    flipped = 0
    for o, i in zip(out, x):
        if torch.equal(o, i.flip(-1)):
            flipped += 1
            assert torch.equal(o[:, :, 0], i[:, :, -1])
        else:
            assert torch.equal(o, i)
    assert 10 < flipped < 54  # both outcomes happen
    assert torch.equal(x, images(64))  # input untouched


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_is_a_window_of_the_padded_image(dtype: torch.dtype, mode: str) -> None:
    p = 2
    x = images(40, c=2, h=6, w=7).to(dtype)
    out = augment_batch(x, Augmentation(crop_padding=p, padding_mode=mode), torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.dtype == dtype
    shifts = set()
    for o, i in zip(out, x):
        pad_mode = "reflect" if mode == "reflect" else "constant"
        padded = F.pad(i.float().unsqueeze(0), (p, p, p, p), mode=pad_mode).squeeze(0)
        hits = [k for k, win in enumerate(windows(padded, 6, 7)) if torch.equal(win, o.float())]
        assert hits, "cropped image is not a window of the padded original"
        shifts.add(hits[0])
    assert len(shifts) > 5  # the shifts differ between images


def test_crop_and_flip_reproducible_and_seed_sensitive() -> None:
    x = images(32)
    aug = Augmentation(flip=True, crop_padding=3)
    a = augment_batch(x, aug, torch.Generator().manual_seed(5))
    b = augment_batch(x, aug, torch.Generator().manual_seed(5))
    c = augment_batch(x, aug, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 4), h=st.integers(5, 9), w=st.integers(5, 9), seed=st.integers(0, 10**6))
def test_zero_crop_keeps_pixels_in_place(p: int, h: int, w: int, seed: int) -> None:
    # every non-zero output pixel, shifted back, equals the input pixel
    x = images(6, c=1, h=h, w=w, seed=seed) | 1  # no zeros in the input
    out = augment_batch(x, Augmentation(crop_padding=p, padding_mode="zeros"), torch.Generator().manual_seed(seed))
    for o, i in zip(out, x):
        padded = F.pad(i.unsqueeze(0).float(), (p, p, p, p)).squeeze(0)
        assert any(torch.equal(win, o.float()) for win in windows(padded, h, w))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cutout_fills_one_clipped_square_per_image(dtype: torch.dtype) -> None:
    """Each image gets one axis-aligned square of side at most s (clipped by the
    border) set to the per-channel fill; every other pixel is untouched."""
    x = images(200, c=3, h=10, w=12).to(dtype)
    fill = (7.0, 100.0, 250.0)
    out = augment_batch(x, Augmentation(cutout=4, cutout_fill=fill), torch.Generator().manual_seed(2))
    value = torch.tensor(fill).view(3, 1, 1).to(dtype)
    full = 0
    for o, i in zip(out, x):
        changed = (o != i).any(0)
        filled = (o == value).all(0)
        assert not (changed & ~filled).any()  # a changed pixel holds the fill
        rows = filled.any(1).nonzero().flatten()
        cols = filled.any(0).nonzero().flatten()
        # the filled pixels of this image form one rectangle of side at most 4
        square = torch.zeros_like(filled)
        square[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert (filled | ~square).all() and torch.equal(o[:, ~square], i[:, ~square])
        assert len(rows) <= 4 and len(cols) <= 4
        full += len(rows) == 4 and len(cols) == 4
    assert full > 50  # most squares lie wholly inside the image
    again = augment_batch(x, Augmentation(cutout=4, cutout_fill=fill), torch.Generator().manual_seed(2))
    assert torch.equal(out, again)


def test_cutout_bad_values() -> None:
    with pytest.raises(ConfigError, match="cutout size"):
        Augmentation(cutout=-1)
    with pytest.raises(ConfigError, match="cutout_fill has 2 values for 3-channel"):
        augment_batch(images(), Augmentation(cutout=2, cutout_fill=(1.0, 2.0)), None)


def test_reflect_padding_too_large() -> None:
    with pytest.raises(ConfigError, match="zeros"):
        augment_batch(images(2, h=3, w=3), Augmentation(crop_padding=3), None)
    with pytest.raises(ConfigError):
        Augmentation(crop_padding=-1)
    with pytest.raises(ConfigError):
        Augmentation(padding_mode="circular")


# --------------------------------------------------------------------------- normalisation


def test_normalize_values() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    out = normalize_batch(x, (0.5,), (0.5,))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, 0, 0], torch.tensor([-1.0, -0.6, 1.0]), atol=1e-6)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize_batch(x, mean, std)
    for c in range(3):
        want = (x[0, c].float() / 255 - mean[c]) / std[c]
        assert torch.allclose(out[0, c], want, atol=1e-6)
    assert torch.allclose(normalize_batch(x.float(), mean, std), out)


def test_normalize_bad_stats() -> None:
    x = images(1)
    with pytest.raises(ConfigError, match="give 1 value or 3"):
        normalize_batch(x, (0.5, 0.5), (0.5,))
    with pytest.raises(ConfigError, match="zero"):
        normalize_batch(x, (0.5,), (0.0,))


# --------------------------------------------------------------------------- BatchLoader


def test_loader_covers_every_index_once_per_epoch() -> None:
    x, y = images(50), torch.arange(50) % 7
    g = torch.Generator().manual_seed(0)
    loader = BatchLoader(x, y, 8, shuffle=True, generator=g)
    assert len(loader) == 7
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert [len(b) for b in batches] == [8] * 6 + [2]
        seen = torch.cat([b.indices for b in batches])
        assert sorted(seen.tolist()) == list(range(50))
        for b in batches:
            assert isinstance(b, Batch)
            assert torch.equal(b.labels, y[b.indices])
            assert torch.allclose(b.images, normalize_batch(x[b.indices], (0.5,), (0.5,)))
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch


def test_loader_same_seed_same_order_and_augmentation() -> None:
    x, y = images(30), torch.arange(30)
    aug = Augmentation(flip=True, crop_padding=2)

    def run(seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        loader = BatchLoader(x, y, 7, shuffle=True, augmentation=aug, generator=g)
        return [t for _ in range(2) for b in loader for t in (b.indices, b.images)]

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_loader_generator_state_resumes() -> None:
    x, y = images(20), torch.arange(20)
    g = torch.Generator().manual_seed(11)
    loader = BatchLoader(x, y, 6, shuffle=True, generator=g, augmentation=Augmentation(flip=True))
    list(loader)
    state = g.get_state()
    nxt = [b.indices for b in loader]
    g.set_state(state)
    again = [b.indices for b in loader]
    assert all(torch.equal(u, v) for u, v in zip(nxt, again))
    assert loader.generator is g


def test_loader_no_shuffle_drop_last_channels_last() -> None:
    x, y = images(10, c=3, h=4, w=4), torch.arange(10)
    loader = BatchLoader(x, y, 4, shuffle=False, drop_last=True, channels_last=True, mean=(0.0,), std=(1.0,))
    batches = list(loader)
    assert len(loader) == 2 == len(batches)
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(8))
    assert batches[0].images.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batches[1].images, x[4:8].float() / 255)


def test_loader_bad_arguments() -> None:
    x, y = images(4), torch.arange(4)
    with pytest.raises(ConfigError, match="batch size"):
        BatchLoader(x, y, 0, shuffle=True)
    with pytest.raises(DataError, match="one label per image"):
        BatchLoader(x, torch.arange(3), 2, shuffle=True)
    with pytest.raises(ConfigError, match="3-channel"):
        BatchLoader(x, y, 2, shuffle=True, mean=(0.5, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu() -> None:
    x, y = images(20), torch.arange(20)
    aug = Augmentation(flip=True, crop_padding=2)

    def run(device: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)  # a CPU generator drives both
        loader = BatchLoader(x, y, 8, shuffle=True, augmentation=aug, device=device, generator=g)
        out = []
        for b in loader:
            assert b.images.device.type == device and b.indices.device.type == device
            out += [b.images.cpu(), b.indices.cpu()]
        return out

    for u, v in zip(run("cpu"), run("cuda")):
        assert torch.allclose(u.float(), v.float(), atol=1e-5)


def test_normalized_batches_keep_order_and_mirror_on_request():
    from mbdml.data.batches import normalize_batch, normalized_batches

    images = torch.randint(0, 256, (10, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = list(normalized_batches(images, 4, mean=(0.4,), std=(0.2,)))
    assert [b.shape[0] for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat(plain), normalize_batch(images, (0.4,), (0.2,)))
    mirrored = list(normalized_batches(images, 4, mean=(0.4,), std=(0.2,), flipped=True, channels_last=True))
    assert torch.equal(torch.cat(mirrored), torch.cat(plain).flip(3))
    assert mirrored[0].is_contiguous(memory_format=torch.channels_last)
