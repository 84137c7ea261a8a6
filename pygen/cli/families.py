"""The families ``pygen train`` offers: a help line and the command-line flags of each.

The defaults themselves live on the model classes (one place): ``Model.for_data(data,
**options)`` builds the default model for the data, ``Model.train_defaults_for(data)`` gives the
steps, batch size and learning rate (``Model.train_defaults`` unless the family sizes them by
the data), each measured (see the classes and the scripts in ``benchmarks/``). A flag's
``dest`` is the ``for_data`` option it sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Family", "FAMILIES", "family"]


@dataclass(frozen=True)
class Family:
    name: str  # the model family's registered name (pygen.models.families())
    help: str
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)  # --flag -> argparse kwargs (dest = option)

    @property
    def model(self) -> Any:
        import pygen.models

        return pygen.models.families()[self.name]

    def build(self, data: Any, options: dict[str, Any]) -> Any:
        """The family's default model for the *train* split ``data``, ``options`` overriding it."""
        return self.model.for_data(data, **options)

    def train(self, data: Any) -> dict[str, Any]:
        """{"steps", "batch_size", "lr"}: the family's training defaults for the *train* split ``data``."""
        return self.model.train_defaults_for(data)


_COND = {"--conditional": dict(action="store_true", default=None,
                               help="vae, gan, flow: condition on the data's labels (pygen sample then takes --labels)")}

_UNCOND = dict(action="store_true", default=None,
               help="diffusion, latent-diffusion: ignore the data's labels; gan: the same (labelled images of "
                    "28x28 and up train class-conditional by default)")

FAMILIES: dict[str, Family] = {
    "vae": Family(
        "vae", "variational autoencoder (Gaussian decoder with running-MSE variance)",
        {"--latent-dim": dict(type=int, help="latent variables (default 16; 32 for data of >= 256 dims)"),
         "--likelihood": dict(choices=("gaussian", "bernoulli"), help="decoder likelihood (default gaussian)"),
         "--gamma": dict(choices=("fixed", "learned", "running"), help="decoder std (default running)"),
         "--hidden": dict(type=int, help="vae: MLP width (default 256; 512 for data of >= 256 dims); flow: conditioner "
                                              "width (default 64)"),
         "--network": dict(choices=("auto", "mlp", "conv"), help="encoder/decoder (default mlp)"), **_COND},
    ),
    "gan": Family(
        "gan", "GAN (hinge loss, spectral norm, lazy R1, EMA generator)",
        {"--z-dim": dict(type=int, help="latent size (default 32)"),
         "--loss": dict(choices=("hinge", "ns", "wgan-gp"), help="(default hinge)"),
         "--r1-gamma": dict(type=float, help="R1 penalty (default 0.1; 0: off)"),
         "--width": dict(type=int, help="conv base width of G and D (default 32)"),
         "--diffaugment": dict(action="store_true", default=None, help="DiffAugment translation + cutout"), **_COND,
         "--unconditional": _UNCOND},
    ),
    "flow": Family(
        "flow", "normalizing flow (Glow for images, RealNVP for points)",
        {"--kind": dict(choices=("glow", "realnvp", "nsf"), help="(default glow for images, realnvp for points)"),
         "--hidden": dict(type=int, help="conditioner width (default 64)"),
         "--depth": dict(type=int, help="Glow steps per level (default 4)"),
         "--levels": dict(type=int, help="Glow levels (default 2)"),
         "--n-layers": dict(type=int, help="RealNVP/NSF couplings (default 8)"), **_COND},
    ),
    "diffusion": Family(
        "diffusion", "denoising diffusion model (pygen.models.Diffusion; class-conditional on labelled data)",
        {"--unconditional": _UNCOND,
         "--pixel": dict(action="store_true", default=None,
                         help="diffusion: denoise pixels even where latent diffusion is the default (images of "
                              "28x28 and larger trained on the CPU)")},
    ),
    "latent-diffusion": Family(
        "latent-diffusion", "diffusion on an autoencoder's latents (pygen.models.LatentDiffusion: 28x28x1 -> 7x7x4; "
        "images only)",
        {"--unconditional": _UNCOND},
    ),
    "sr": Family(
        "sr", "diffusion super-resolution (pygen.models.SuperResolution; data with low-res inputs, e.g. patches)",
    ),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]
