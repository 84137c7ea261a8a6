"""The model families ``pygen train`` knows, with their default configurations.

One place for the defaults: each was measured to beat the fitted-Gaussian bar of
:func:`pygen.metrics.evaluate` on ``--data digits`` within minutes on 2 CPU cores (see
README.md and the scripts in ``benchmarks/``):

- vae: ``benchmarks/vae_digits.py``'s "gaussian-running" VAE (MLP, 16 latents, running-MSE
  decoder variance), 2000 steps of 128 at lr 2e-3: FD 5.0 vs the bar's 14.85, ~95 s on one
  thread;
- gan: ``benchmarks/gan_digits.py``'s default (hinge loss, spectral norm, lazy R1 0.1 every 4,
  EMA 0.999, Adam betas (0, 0.99)), 4000 steps of 64 at lr 5e-4;
- flow: ``benchmarks/flow_digits.py``'s Glow (2 levels x depth 4, hidden 64, 17 bins on the
  digits), 1500 steps of 128 at lr 1e-3: FD 6.7, 2.35 bits/dim, ~40 s;
- diffusion, sr: the model module's own ``for_data`` and ``train_defaults``.

A family is ``Family(name, build(data, options) -> model, train defaults, help)``. ``data`` is
the *train* split (:class:`pygen.data.Data`); ``options`` override the default constructor
arguments (``--option key=value``, ``--config FILE``, the family flags).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pygen.data import Data

__all__ = ["Family", "FAMILIES", "family", "FamilyUnavailable", "model_defaults", "train_data"]


class FamilyUnavailable(RuntimeError):
    """A family whose model class is not part of this pygen (yet)."""


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    build: Callable[[Data, dict[str, Any]], Any]
    train: Callable[[], dict[str, Any]]  # {"steps", "batch_size", "lr"}
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)  # --flag -> argparse kwargs (dest = option)


def _num_classes(data: Data, options: dict[str, Any]) -> int | None:
    """``conditional: true`` -> the number of classes of the labelled data."""
    if not options.pop("conditional", False):
        return options.pop("num_classes", None)
    if data.labels is None:
        raise ValueError(f"--conditional needs labelled data; {data.name} has no labels")
    return int(data.labels.max()) + 1


# ---- vae --------------------------------------------------------------------------------

VAE_DEFAULTS: dict[str, Any] = {"latent_dim": 16, "likelihood": "gaussian", "gamma": "running", "network": "mlp",
                                "hidden": 256}


def _build_vae(data: Data, options: dict[str, Any]) -> Any:
    from pygen.models import VAE

    opts = {**VAE_DEFAULTS, **options}
    num_classes = _num_classes(data, opts)
    return VAE(data.shape, num_classes=num_classes, **opts)


# ---- gan --------------------------------------------------------------------------------

GAN_DEFAULTS: dict[str, Any] = {"z_dim": 32, "loss": "hinge", "n_dis": 1, "r1_gamma": 0.1, "r1_every": 4,
                                "g_width": 32, "d_width": 32, "g_norm": "batch", "ema_decay": 0.999,
                                "lr_ratio": 1.0, "betas": [0.0, 0.99]}


def _build_gan(data: Data, options: dict[str, Any]) -> Any:
    from pygen.models import GAN

    opts = {**GAN_DEFAULTS, **options}
    if "width" in opts:  # one flag for both networks
        opts["g_width"] = opts["d_width"] = opts.pop("width")
    num_classes = _num_classes(data, opts)
    return GAN(data.shape, num_classes=num_classes, **opts)


# ---- flow -------------------------------------------------------------------------------


def flow_defaults(data: Data) -> dict[str, Any]:
    if data.kind == "image" and data.shape[1] % 4 == 0 and data.shape[2] % 4 == 0:
        return {"kind": "glow", "bins": data.bins, "levels": 2, "depth": 4, "hidden": 64}
    if data.kind == "image":  # sides not divisible by 4: a vector flow over the pixels
        return {"kind": "realnvp", "bins": data.bins, "hidden": 256, "n_layers": 8}
    return {"kind": "realnvp", "bins": None, "hidden": 64, "n_layers": 8}


def _build_flow(data: Data, options: dict[str, Any]) -> Any:
    from pygen.models import Flow

    opts = {**flow_defaults(data), **options}
    if opts["kind"] != flow_defaults(data)["kind"]:  # another kind: drop the default kind's layer options
        for k in ("levels", "depth", "n_layers", "hidden"):
            if k not in options:
                opts.pop(k, None)
    num_classes = _num_classes(data, opts)
    return Flow(opts.pop("kind"), data.shape, num_classes=num_classes, **opts)


# ---- diffusion, super-resolution (pygen.models.diffusion) --------------------------------


def _model_class(name: str) -> Any:
    import pygen.models

    cls = getattr(pygen.models, name, None)
    if cls is None or not hasattr(cls, "for_data"):
        raise FamilyUnavailable(f"pygen.models.{name} is not available in this version of pygen")
    return cls


def _build_from(name: str) -> Callable[[Data, dict[str, Any]], Any]:
    def build(data: Data, options: dict[str, Any]) -> Any:
        opts = dict(options)
        if opts.pop("unconditional", False):  # for_data conditions on the labels when the data has them
            opts["num_classes"] = None
        return _model_class(name).for_data(data, **opts)

    return build


def _train_from(name: str) -> Callable[[], dict[str, Any]]:
    def train() -> dict[str, Any]:
        return dict(getattr(_model_class(name), "train_defaults", {"steps": 2000, "batch_size": 128, "lr": None}))

    return train


_COND = {"--conditional": dict(action="store_true", default=None,
                               help="vae, gan, flow: condition on the data's labels (pygen sample then takes --labels)")}

FAMILIES: dict[str, Family] = {
    "vae": Family(
        "vae", "variational autoencoder (Gaussian decoder with running-MSE variance)", _build_vae,
        lambda: {"steps": 2000, "batch_size": 128, "lr": 2e-3},
        {"--latent-dim": dict(type=int, help="latent variables (default 16)"),
         "--likelihood": dict(choices=("gaussian", "bernoulli"), help="decoder likelihood (default gaussian)"),
         "--gamma": dict(choices=("fixed", "learned", "running"), help="decoder std (default running)"),
         "--hidden": dict(type=int, help="vae: MLP width (default 256); flow: conditioner width (default 64)"),
         "--network": dict(choices=("auto", "mlp", "conv"), help="encoder/decoder (default mlp)"), **_COND},
    ),
    "gan": Family(
        "gan", "GAN (hinge loss, spectral norm, lazy R1, EMA generator)", _build_gan,
        lambda: {"steps": 4000, "batch_size": 64, "lr": 5e-4},
        {"--z-dim": dict(type=int, help="latent size (default 32)"),
         "--loss": dict(choices=("hinge", "ns", "wgan-gp"), help="(default hinge)"),
         "--r1-gamma": dict(type=float, help="R1 penalty (default 0.1; 0: off)"),
         "--width": dict(type=int, help="conv base width of G and D (default 32)"),
         "--diffaugment": dict(action="store_true", default=None, help="DiffAugment translation + cutout"), **_COND},
    ),
    "flow": Family(
        "flow", "normalizing flow (Glow for images, RealNVP for points)", _build_flow,
        lambda: {"steps": 1500, "batch_size": 128, "lr": 1e-3},
        {"--kind": dict(choices=("glow", "realnvp", "nsf"), help="(default glow for images, realnvp for points)"),
         "--hidden": dict(type=int, help="conditioner width (default 64)"),
         "--depth": dict(type=int, help="Glow steps per level (default 4)"),
         "--levels": dict(type=int, help="Glow levels (default 2)"),
         "--n-layers": dict(type=int, help="RealNVP/NSF couplings (default 8)"), **_COND},
    ),
    "diffusion": Family(
        "diffusion", "denoising diffusion model (pygen.models.Diffusion; class-conditional on labelled data)",
        _build_from("Diffusion"), _train_from("Diffusion"),
        {"--unconditional": dict(action="store_true", default=None, help="diffusion: ignore the data's labels")},
    ),
    "sr": Family(
        "sr", "diffusion super-resolution (pygen.models.SuperResolution; data with low-res inputs, e.g. patches)",
        _build_from("SuperResolution"), _train_from("SuperResolution"),
    ),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_defaults(name: str, data: Data) -> dict[str, Any]:
    """The default constructor options of a family for this data (for --help and the record)."""
    return {"vae": VAE_DEFAULTS, "gan": GAN_DEFAULTS}.get(name) or (flow_defaults(data) if name == "flow" else {})


def train_data(model: Any, split: Data) -> Any:
    """What :func:`pygen.train.fit` trains ``model`` on: (x, labels) for a class-conditional
    model, else x (super-resolution models make their low-res inputs from x themselves)."""
    if (getattr(model, "config", None) or {}).get("num_classes") and split.labels is not None:
        return (split.data, split.labels)
    return split.data
