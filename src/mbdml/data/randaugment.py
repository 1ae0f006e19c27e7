"""RandAugment on whole batches: the strong augmentation of consistency training.

FixMatch (Sohn et al., 2020) trains on a *strongly* augmented view of each unlabelled
image with the pseudo-label found on a weak view of it, so the network must give the
same class through large changes of colour and geometry. The strong view is
RandAugment with a magnitude drawn at random per image (Cubuk et al., 2020) followed
by Cutout. ``mbdml_semi`` and ``mbdml1_semi`` use it on their pseudo-labelled images
with ``--pseudo_augment randaugment`` (their pseudo-labels come from the clean image
at each refresh).

Everything is done on the (B, C, H, W) batch with tensor ops, in the 0..255 scale the
other batch augmentations use: each round draws one operation per image, and each
operation runs once on the images that drew it. Geometric operations are one
``affine_grid`` / ``grid_sample`` over those images, filled with the fill colour;
colour operations follow PIL's definitions (a blend with a degenerate image for
brightness, colour, contrast and sharpness). Every random number comes from the
caller's generator, in a fixed order, so a run stays reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mbdml.data.batches import Augmentation, _rand, _randint, augment_batch
from mbdml.errors import ConfigError, DataError

__all__ = ["RANDAUGMENT_OPS", "RandAugment", "randaugment_batch"]

# the ranges at magnitude 1 (FixMatch's RandAugment pool, with the enhance factors
# symmetric around 1 as in RandAugment: 1 +- 0.9)
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # a share of the image side
MAX_ENHANCE = 0.9
MIN_POSTERIZE_BITS = 4


@dataclass
class RandAugment:
    """``num_ops`` random operations per image, each at a magnitude drawn uniformly in
    [0, ``magnitude``] (1 is the full range: 30 degrees of rotation, a shear of 0.3, a
    shift of 30% of the side, enhance factors 0.1-1.9, 4 bits of posterize, solarize
    from 0), then one square of ``cutout_fraction`` of the side set to ``fill`` (one
    value per channel, or one for all, in the 0..255 scale: the normalisation mean, so
    the square becomes 0, and the colour that geometric operations bring in)."""

    num_ops: int = 2
    magnitude: float = 1.0
    cutout_fraction: float = 0.5
    fill: tuple[float, ...] = (127.5,)

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 0:
            raise ConfigError(f"RandAugment needs a whole number of operations >= 0, got {self.num_ops!r}; pass --randaugment_ops 2")
        if not 0 <= self.magnitude <= 1:
            raise ConfigError(f"RandAugment magnitude must be in [0, 1] (1: the full range), got {self.magnitude}; pass --randaugment_magnitude 1")
        if not 0 <= self.cutout_fraction < 1:
            raise ConfigError(f"cutout_fraction must be in [0, 1) (a share of the image side), got {self.cutout_fraction}")
        self.fill = tuple(float(v) for v in self.fill)
        if not self.fill:
            raise ConfigError("RandAugment fill needs one value, or one per channel")


def _fill(x: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
    c = x.shape[1]
    if len(fill) not in (1, c):
        raise ConfigError(f"RandAugment fill has {len(fill)} values for {c}-channel images; give one value or {c}")
    return torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1).expand(1, c, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luminance (ITU-R 601-2, PIL's "L"); a grey image is its own."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor (x - degenerate)``, clipped to 0..255."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255)


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image resampled (bilinear) through its own 2x3 ``matrix``, which maps output
    to input positions in the [-1, 1] coordinates of ``affine_grid`` (pixel centres,
    ``align_corners=False``); positions outside the image take ``fill``."""
    grid = F.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    # zero padding of (x - fill) is padding with fill once it is added back
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.clamp(0, 255)


def _rotation(degrees: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Rotation about the centre by ``degrees`` (counter-clockwise on screen), in the
    normalised coordinates (which stretch x and y by the side lengths)."""
    t = torch.deg2rad(degrees)
    cos, sin = torch.cos(t), torch.sin(t)
    m = torch.zeros(degrees.shape[0], 2, 3, dtype=degrees.dtype, device=degrees.device)
    m[:, 0, 0] = cos
    m[:, 0, 1] = -sin * h / w
    m[:, 1, 0] = sin * w / h
    m[:, 1, 1] = cos
    return m


def _identity_matrix(n: int, ref: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, dtype=ref.dtype, device=ref.device).expand(n, 2, 3).clone()


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image (values rounded to 0..255):
    value v goes to 255 (cdf(v) - cdf_min) / (N - cdf_min); a flat channel is kept."""
    b, c, h, w = x.shape
    v = x.round().clamp(0, 255).long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=x.dtype))
    cdf = hist.cumsum(1)
    first = cdf.gather(1, v.min(1, keepdim=True).values)  # the cdf at the smallest value present
    span = (h * w - first).clamp_min(1)
    lut = ((cdf - first) * 255 / span).round().clamp(0, 255)
    out = lut.gather(1, v)
    flat = (h * w - first) == 0
    out = torch.where(flat, x.reshape(b * c, h * w), out)
    return out.view(b, c, h, w)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Each channel of each image stretched so its darkest value is 0 and its brightest 255."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) * 255 / span.clamp_min(1e-6), x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre weight 5, the others 1, over 13); the border kept."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return out


def _signed(magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    return magnitude * torch.where(sign, -1.0, 1.0).to(magnitude.dtype)


# each op: (images, magnitude in [0, 1], sign coin, fill) -> images
def _op_identity(x, m, s, fill):
    return x


def _op_autocontrast(x, m, s, fill):
    return autocontrast(x)


def _op_equalize(x, m, s, fill):
    return equalize(x)


def _op_rotate(x, m, s, fill):
    return affine(x, _rotation(_signed(m, s) * MAX_ROTATE_DEGREES, x.shape[2], x.shape[3]), fill)


def _op_shear_x(x, m, s, fill):
    a = _identity_matrix(x.shape[0], m)
    a[:, 0, 1] = _signed(m, s) * MAX_SHEAR * x.shape[2] / x.shape[3]
    return affine(x, a, fill)


def _op_shear_y(x, m, s, fill):
    a = _identity_matrix(x.shape[0], m)
    a[:, 1, 0] = _signed(m, s) * MAX_SHEAR * x.shape[3] / x.shape[2]
    return affine(x, a, fill)


def _op_translate_x(x, m, s, fill):
    a = _identity_matrix(x.shape[0], m)
    a[:, 0, 2] = _signed(m, s) * MAX_TRANSLATE * 2  # the side is 2 in normalised coordinates
    return affine(x, a, fill)


def _op_translate_y(x, m, s, fill):
    a = _identity_matrix(x.shape[0], m)
    a[:, 1, 2] = _signed(m, s) * MAX_TRANSLATE * 2
    return affine(x, a, fill)


def _op_brightness(x, m, s, fill):
    return _blend(torch.zeros_like(x), x, 1 + _signed(m, s) * MAX_ENHANCE)


def _op_color(x, m, s, fill):
    return _blend(_grey(x).expand_as(x), x, 1 + _signed(m, s) * MAX_ENHANCE)


def _op_contrast(x, m, s, fill):
    return _blend(_grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), x, 1 + _signed(m, s) * MAX_ENHANCE)


def _op_sharpness(x, m, s, fill):
    return _blend(_smooth(x), x, 1 + _signed(m, s) * MAX_ENHANCE)


def _op_posterize(x, m, s, fill):
    bits = 8 - torch.round(m * (8 - MIN_POSTERIZE_BITS))  # 8 (unchanged) .. 4
    step = torch.pow(2.0, 8 - bits).view(-1, 1, 1, 1).to(x.dtype)
    return torch.floor(x.round() / step) * step


def _op_solarize(x, m, s, fill):
    threshold = torch.floor(256 * (1 - m)).view(-1, 1, 1, 1).to(x.dtype)  # 256: unchanged, 0: every value inverted
    return torch.where(x >= threshold, 255 - x, x)


_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "identity": _op_identity,
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize,
    "rotate": _op_rotate,
    "solarize": _op_solarize,
    "color": _op_color,
    "posterize": _op_posterize,
    "contrast": _op_contrast,
    "brightness": _op_brightness,
    "sharpness": _op_sharpness,
    "shear_x": _op_shear_x,
    "shear_y": _op_shear_y,
    "translate_x": _op_translate_x,
    "translate_y": _op_translate_y,
}
RANDAUGMENT_OPS: tuple[str, ...] = tuple(_OPS)


def apply_op(name: str, x: torch.Tensor, magnitude: torch.Tensor, negative: torch.Tensor, fill: tuple[float, ...] = (127.5,)) -> torch.Tensor:
    """One RandAugment operation on every image of the float batch ``x`` (0..255), at a
    per-image ``magnitude`` in [0, 1] and direction (``negative``: rotate clockwise,
    shift left or up, darken, ...)."""
    if name not in _OPS:
        raise ConfigError(f"RandAugment operation {name!r} is not known; choose one of: {', '.join(RANDAUGMENT_OPS)}")
    return _OPS[name](x, magnitude.to(x.dtype), negative, _fill(x, fill))


def randaugment_batch(x: torch.Tensor, aug: RandAugment, generator: torch.Generator | None) -> torch.Tensor:
    """A strongly augmented float32 copy (0..255) of the (B, C, H, W) batch ``x`` (uint8 or
    float, 0..255), on ``x``'s device.

    Random draws, per round: B operation indices, B magnitudes, B sign coins; then the
    Cutout square's draws (see :func:`mbdml.data.batches.augment_batch`). ``x`` is left
    untouched.
    """
    if x.dim() != 4:
        raise DataError(f"randaugment_batch needs a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    out = x.to(torch.float32, copy=True)
    b, _, h, w = out.shape
    if b == 0:
        return out
    fill = _fill(out, aug.fill)
    ops = list(_OPS.values())
    for _ in range(aug.num_ops):
        which = _randint(len(ops), (b,), generator, out.device)
        magnitude = _rand((b,), generator, out.device) * aug.magnitude
        negative = _rand((b,), generator, out.device) < 0.5
        for i, op in enumerate(ops):
            sel = (which == i).nonzero().flatten()
            if sel.numel() == 0 or op is _op_identity:
                continue
            out[sel] = op(out[sel], magnitude[sel], negative[sel], fill)
    side = int(math.floor(aug.cutout_fraction * min(h, w)))
    if side > 0:
        out = augment_batch(out, Augmentation(cutout=side, cutout_fill=aug.fill), generator)
    return out
