"""Image-conditioned diffusion stages: :class:`SuperResolution` (a low-resolution image in,
with noise augmentation), :class:`Colorization` (a grayscale image in) and :class:`Cascade`
(a base model, then a super-resolution stage).

Both stages are :class:`pygen.models.Diffusion` models whose UNet takes the condition as
extra input channels at the output resolution (the low-resolution image upsampled, or the
luminance). Their training batches are the targets alone: the condition is computed from
the target (area down-sampling, as :func:`pygen.data.patches` makes its inputs; ITU-R 601
luminance), so any image data trains them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pygen.models.diffusion import Diffusion
from pygen.models.inference import sampling
from pygen.models.seeding import Stream, derive_seed, resolve_seed
from pygen.ops import randn

__all__ = ["SuperResolution", "Colorization", "Cascade", "luminance", "with_luminance"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: these weights sum to 1


def luminance(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luminance Y = 0.299 R + 0.587 G + 0.114 B."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def with_luminance(rgb: Tensor, y: Tensor, data_range: list[float] | None = None) -> Tensor:
    """RGB images (B, 3, H, W) with luminance exactly ``y`` (B, 1, H, W), staying in
    ``data_range``: keep each pixel's chroma c = rgb - Y(rgb) (Y(c) = 0) and set rgb = y + l c,
    l <= 1 the largest factor that keeps every channel in range (grey, l = 0, always fits)."""
    c = rgb - luminance(rgb)
    if data_range is None:
        return y + c
    lo, hi = data_range
    inf = torch.full_like(c, math.inf)
    room = torch.where(c > 0, (hi - y) / c, torch.where(c < 0, (lo - y) / c, inf))
    lam = room.amin(1, keepdim=True).clamp(0, 1)
    return (y + lam * c).clamp(lo, hi)  # the clamp only takes off rounding (~1e-8)


class SuperResolution(Diffusion, family="sr"):
    """A diffusion model of (C, H, W) images given their (C, ceil(H/scale), ceil(W/scale))
    version: the means of scale x scale blocks (the last row/column of blocks partial when a
    side is not a multiple of scale).

    The condition is the low-resolution image bicubic-upsampled to (H, W) and concatenated to
    the UNet's input. Noise augmentation (cascaded diffusion, Ho et al. 2021): in training
    the condition gets Gaussian noise of a level a ~ U(0, ``aug_max``) (model space, [-1, 1]
    images), and a is passed to the network, so that at sampling a chosen level
    (``aug_level``, default ``sample_aug``) makes the stage robust to the base model's
    artefacts. Sample with ``sample(n, low_res=...)``.
    """

    train_defaults: ClassVar[dict[str, Any]] = {"steps": 2000, "batch_size": 64, "lr": 5e-4}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}  # not Diffusion's: none sized for this stage yet

    def __init__(self, shape: tuple[int, ...] | list[int], *, scale: int = 4, aug_max: float = 0.2,
                 sample_aug: float = 0.0, **options: Any) -> None:
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        if not isinstance(scale, int) or not 1 <= scale <= min(shape[1:]):
            raise ValueError(f"scale must be an int in [1, min(H, W)] = [1, {min(shape[1:])}], got {scale!r}")
        options.pop("cond_channels", None)
        options.pop("aug_conditioning", None)
        options.pop("num_classes", None)
        super().__init__(shape, cond_channels=int(shape[0]), aug_conditioning=True, **options)
        self.scale, self.aug_max, self.sample_aug = int(scale), float(aug_max), float(sample_aug)
        self.config.update(scale=self.scale, aug_max=self.aug_max, sample_aug=self.sample_aug)
        for k in ("cond_channels", "aug_conditioning", "num_classes"):
            self.config.pop(k)

    @classmethod
    def for_data(cls, data: Any, **options: Any) -> SuperResolution:
        """From super-resolution data (``data.low_res`` set: its scale) or any image data (x4)."""
        low_res = getattr(data, "low_res", None)
        if low_res is not None and "scale" not in options:
            options["scale"] = -(-data.shape[-1] // low_res.shape[-1])
        return cls(tuple(data.shape), **options)

    @property
    def low_res_shape(self) -> tuple[int, int, int]:
        c, h, w = self.shape
        return (c, -(-h // self.scale), -(-w // self.scale))

    def downsample(self, hr: Tensor) -> Tensor:
        """The degradation the stage inverts: the mean of each scale x scale block (of the
        pixels a partial block at the bottom/right edge has)."""
        return F.avg_pool2d(hr, self.scale, ceil_mode=True)

    def _expand(self, low_res: Tensor, mode: str) -> Tensor:
        # block j covers pixels [j * scale, (j + 1) * scale): upsample by scale, then crop
        up = F.interpolate(low_res, scale_factor=self.scale, mode=mode, **({} if mode == "nearest" else
                                                                            {"align_corners": False}))
        return up[..., : self.shape[1], : self.shape[2]]

    def upsample(self, low_res: Tensor) -> Tensor:
        """Bicubic upsampling to the output size (the condition, and the PSNR baseline)."""
        return self._expand(low_res, "bicubic")

    def _condition(self, lr_model: Tensor, level: Tensor, noise: Tensor) -> dict[str, Tensor]:
        up = self.upsample(lr_model + level.view(-1, 1, 1, 1) * noise)
        return {"cond": up, "aug_level": 1000.0 * level}

    def training_inputs(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = self.to_model(x)
        low_res = self.downsample(x0)
        level = torch.rand(x0.shape[0], device=x0.device) * self.aug_max
        return x0, self._condition(low_res, level, torch.randn_like(low_res))

    def project(self, x: Tensor, low_res: Tensor) -> Tensor:
        """x made consistent with ``low_res``: x + nearest-upsample(low_res - downsample(x)), the
        orthogonal projection onto {x : downsample(x) = low_res} (area down-sampling), clamped to
        the data's range. It can only bring a sample closer to any image consistent with low_res."""
        x = x + self._expand(low_res.to(x.dtype) - self.downsample(x), "nearest")
        return x if self.data_range is None else x.clamp(*self.data_range)

    @sampling
    def sample(self, n: int | None = None, *, low_res: Tensor, seed: int | None = None,
               generator: torch.Generator | None = None, offset: int = 0, aug_level: float | None = None,
               consistent: bool = True, **kwargs: Any) -> Tensor:
        """(n, *shape) high-resolution samples of ``low_res`` (n, *low_res_shape) in the data's range
        (n defaults to len(low_res)). ``aug_level``: the condition's noise level (default
        ``sample_aug``). ``consistent``: :meth:`project` each sample onto the images whose
        down-sampling is ``low_res`` (a sample's block means then equal low_res exactly). Other
        keywords as :meth:`Diffusion.sample`."""
        if not isinstance(low_res, Tensor) or tuple(low_res.shape[1:]) != self.low_res_shape:
            raise ValueError(f"low_res must be (n, {', '.join(map(str, self.low_res_shape))}), got "
                             f"{tuple(low_res.shape) if isinstance(low_res, Tensor) else type(low_res).__name__}")
        n = low_res.shape[0] if n is None else n
        if low_res.shape[0] != n:
            raise ValueError(f"low_res has {low_res.shape[0]} images for n={n} samples")
        s = resolve_seed(seed, generator)
        level = self.sample_aug if aug_level is None else float(aug_level)
        if not 0 <= level <= 1:
            raise ValueError(f"aug_level must be in [0, 1], got {level}")
        dev = self.alphas_cumprod.device
        low_res_m = self.to_model(low_res.to(dev, torch.float32))
        d = math.prod(self.low_res_shape)
        noise = randn(n, *self.low_res_shape, seed=derive_seed(s, Stream.SR_AUGMENT), offset=offset * d, device=dev)
        cond = self._condition(low_res_m, torch.full((n,), level, device=dev), noise)
        out = super().sample(n, seed=s, offset=offset, **cond, **kwargs)
        return self.project(out, low_res.to(dev, out.dtype)) if consistent else out


class Colorization(Diffusion, family="colorize"):
    """A diffusion model of RGB images given their luminance (the grayscale image as one extra
    input channel). :meth:`colorize` gives several plausible colourings per input; with
    ``match_luminance`` (default) their luminance equals the input's exactly
    (:func:`with_luminance`: each pixel's chroma kept, scaled down where needed to stay in
    range)."""

    train_defaults: ClassVar[dict[str, Any]] = {"steps": 2000, "batch_size": 64, "lr": 5e-4}
    presets: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}  # not Diffusion's: none sized for this stage yet

    def __init__(self, shape: tuple[int, ...] | list[int], **options: Any) -> None:
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"shape must be (3, H, W) RGB, got {tuple(shape)}")
        for k in ("cond_channels", "aug_conditioning", "num_classes"):
            options.pop(k, None)
        super().__init__(shape, cond_channels=1, **options)
        for k in ("cond_channels", "aug_conditioning", "num_classes"):
            self.config.pop(k)

    @classmethod
    def for_data(cls, data: Any, **options: Any) -> Colorization:
        return cls(tuple(data.shape), **options)

    def training_inputs(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = self.to_model(x)
        return x0, {"cond": luminance(x0)}

    @sampling
    def sample(self, n: int | None = None, *, gray: Tensor, seed: int | None = None,
               generator: torch.Generator | None = None, offset: int = 0, match_luminance: bool = True,
               **kwargs: Any) -> Tensor:
        """(n, 3, H, W) colourings of ``gray`` (n, 1, H, W) (luminance in the data's range)."""
        if not isinstance(gray, Tensor) or gray.dim() != 4 or gray.shape[1] != 1 or tuple(gray.shape[2:]) != self.shape[1:]:
            raise ValueError(f"gray must be (n, 1, {self.shape[1]}, {self.shape[2]})")
        n = gray.shape[0] if n is None else n
        if gray.shape[0] != n:
            raise ValueError(f"gray has {gray.shape[0]} images for n={n} samples")
        dev = self.alphas_cumprod.device
        g = gray.to(dev, torch.float32)
        out = super().sample(n, seed=resolve_seed(seed, generator), offset=offset, cond=self.to_model(g), **kwargs)
        return with_luminance(out, g, self.data_range) if match_luminance else out

    def colorize(self, gray: Tensor, n: int = 4, *, seed: int | None = None, **kwargs: Any) -> Tensor:
        """``n`` colourings of each of ``gray`` (B, 1, H, W): (B, n, 3, H, W); colouring j of
        image b is stream index b * n + j."""
        b = gray.shape[0]
        out = self.sample(b * n, gray=gray.repeat_interleave(n, 0), seed=seed, **kwargs)
        return out.reshape(b, n, *self.shape)


class Cascade(nn.Module):
    """Sample small, then upsample: ``base.sample`` then ``sr.sample(low_res=...)``.

    Sample i depends on (seed, offset + i) only: the stages use seed and a seed derived from
    it. ``base_kwargs`` / ``sr_kwargs`` go to each stage (sampler, steps, labels, ...).
    ``adapt`` maps the base's samples to the SR stage's inputs when the base was trained on
    another low-resolution version of the data than the SR stage's down-sampling of it (the
    8x8 digits vs the block means of their 16x16 bilinear upsampling: adapt = sr.downsample
    of the bilinear upsampling).
    """

    def __init__(self, base: Diffusion, sr: SuperResolution,
                 adapt: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if tuple(base.shape) != sr.low_res_shape:
            raise ValueError(f"the base model makes {tuple(base.shape)} images, the SR stage takes {sr.low_res_shape}")
        self.base, self.sr, self.adapt = base, sr, adapt

    @sampling
    def sample(self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, offset: int = 0,
               base_kwargs: dict[str, Any] | None = None, sr_kwargs: dict[str, Any] | None = None,
               return_low: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        s = resolve_seed(seed, generator)
        low = self.base.sample(n, seed=s, offset=offset, **(base_kwargs or {}))
        low_res = low if self.adapt is None else self.adapt(low)
        high = self.sr.sample(n, low_res=low_res, seed=derive_seed(s, Stream.CASCADE_SR), offset=offset, **(sr_kwargs or {}))
        return (high, low) if return_low else high
