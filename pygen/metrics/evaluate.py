"""``evaluate(model, data)``: every indicator that applies, beside two baselines computed the same way.

A number alone means little (FD depends on the feature space and the sample size), so each
is reported next to

- ``baseline_data``: the data's own held-out split scored as if it were samples: the floor,
  what a perfect model would get at this sample size;
- ``baseline_gaussian``: a Gaussian fitted to the training data (mean and full covariance
  in pixel / point space), its samples clipped to the data range: the bar every model must
  beat;
- ``baseline_bicubic`` (super-resolution data only): bicubic up-sampling of the inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pygen.data import TOY2D, TOY2D_DENSITIES, Data, load, toy2d, toy2d_log_prob, train_test
from pygen.data.files import _TOY_TEST_SEED
from pygen.data.storage import take
from pygen.flows import dequantize
from pygen.metrics.features import DigitsFeatures, FashionFeatures
from pygen.metrics.likelihood import bits_per_dim, dataset_log_likelihood
from pygen.metrics.restoration import psnr
from pygen.metrics.sample_quality import density_coverage, feature_moments, frechet_distance, kid, mmd, precision_recall
from pygen.models.inference import eval_mode, model_device
from pygen.models.seeding import Stream, derive_seed

__all__ = ["evaluate", "format_table", "feature_space", "METRICS"]

#: metric -> (what it is, better direction), in table order
METRICS: dict[str, tuple[str, str]] = {
    "fd": ("Frechet distance", "lower"),
    "kid": ("KID (x 1)", "lower"),
    "kid_std": ("KID std over subsets", ""),
    "precision": ("precision (k=3)", "higher"),
    "recall": ("recall (k=3)", "higher"),
    "density": ("density (k=5)", "~1"),
    "coverage": ("coverage (k=5)", "higher"),
    "mmd": ("Gaussian-kernel MMD^2", "lower"),
    "psnr": ("PSNR to the target, dB", "higher"),
    "nll": ("NLL, nats per example", "lower"),
    "nll_se": ("NLL standard error", ""),
    "nll_bpd": ("NLL, bits per dim", "lower"),
}


FeatureFn = Callable[[Tensor], Tensor]


def feature_space(data: Data, features: str | FeatureFn = "auto") -> tuple[str, FeatureFn]:
    """(name, fn) of the space the sample metrics work in; fn maps (N, ...) -> (N, D).

    "auto": "points" (the points themselves) for (N, D) data; "digits"
    (:class:`DigitsFeatures`' 64-d penultimate layer, the FID analogue) for 1-channel square
    images of 8, 16 or 32 px; "fashion-mnist" (:class:`FashionFeatures`' 128-d layer) for
    (1, 28, 28) images (Fashion-MNIST, and MNIST-like data); otherwise "pixels" (flattened
    pixels, C*H*W dims: meant for small images such as the 32 px patches). A callable is used
    as given ("custom").
    """
    if callable(features):
        return "custom", features
    if features == "auto":
        s = data.shape
        digit_like = s[0] == 1 and s[1] == s[2] and s[1] in (8, 16, 32)
        if data.kind == "points":
            features = "points"
        elif digit_like:
            features = "digits"
        else:
            features = "fashion-mnist" if tuple(s) == (1, 28, 28) else "pixels"
    if features == "points":
        return "points", lambda x: x.flatten(1)
    if features == "pixels":
        return "pixels", lambda x: x.flatten(1)
    if features == "digits":
        net = DigitsFeatures.pretrained()

        def digit_feats(x: Tensor) -> Tensor:
            return net.to(x.device).features(x)

        return "digits", digit_feats
    if features == "fashion-mnist":
        fnet = FashionFeatures.pretrained()

        def fashion_feats(x: Tensor) -> Tensor:
            return fnet.to(x.device).features(x)

        return "fashion-mnist", fashion_feats
    raise ValueError(f"features must be 'auto', 'digits', 'fashion-mnist', 'pixels', 'points' or a callable, "
                     f"got {features!r}")


def _sample(model: Any, n: int, seed: int, batch_size: int, **cond: Tensor) -> Tensor:
    """n samples; in chunks of batch_size via ``offset=`` when sample() takes it (samples then
    depend on (seed, index) only), else in one call. Eval mode, no gradients."""
    try:
        takes_offset = "offset" in inspect.signature(model.sample).parameters
    except (TypeError, ValueError):  # a callable without a readable signature: one call
        takes_offset = False
    with torch.no_grad(), (eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()):
        if not takes_offset:
            return model.sample(n, seed=seed, **cond)
        parts = []
        for i in range(0, n, batch_size):
            m = min(batch_size, n - i)
            parts.append(model.sample(m, seed=seed, offset=i, **{k: v[i : i + m] for k, v in cond.items()}))
        return torch.cat(parts)


def _likelihood_fn(model: Any, iwae_k: int, seed: int, labels: Tensor | None) -> tuple[Any, str] | None:
    """(fn(x, offset) -> (B,) log-likelihoods of examples offset.., what it is), or None when the
    model has no likelihood. A conditional model gets each example's label; an IWAE bound
    gets a seed and the examples' indices, so its draws depend on (seed, example) only."""
    conditional = bool((getattr(model, "config", None) or {}).get("num_classes"))
    if conditional and labels is None:
        return None  # a class-conditional likelihood needs labelled test data
    lab = (lambda i, b: {"labels": labels[i : i + b]}) if conditional else (lambda i, b: {})
    if hasattr(model, "log_prob"):
        if any(getattr(model, "pad", ())):  # a padded Glow: seeded augmentation pixels per example
            s = derive_seed(seed, Stream.AUGMENT)
            return ((lambda x, i: model.log_prob(x, **lab(i, len(x)), seed=s, offset=i)),
                    "log_prob (of x and augmentation pixels: an upper bound on the NLL)")
        return (lambda x, i: model.log_prob(x, **lab(i, len(x)))), "log_prob (exact)"
    if hasattr(model, "log_likelihood"):
        params = inspect.signature(model.log_likelihood).parameters
        seeded = {"seed": derive_seed(seed, Stream.IWAE)} if "seed" in params else {}

        def iwae(x: Tensor, i: int) -> Tensor:
            at = {"offset": i} if "offset" in params else {}
            return model.log_likelihood(x, k=iwae_k, **lab(i, len(x)), **seeded, **at)

        return iwae, f"log_likelihood (IWAE, k={iwae_k}: an upper bound on the NLL)"
    return None


#: the k-NN metrics (precision/recall, density/coverage) use at most this many reference
#: features, a seeded subset: their cost is quadratic in the reference (60,000 Fashion-MNIST
#: images took minutes and ~20 GB); FD and KID use every reference feature
KNN_REFERENCE = 10_000


def _knn_reference(ref: Tensor, seed: int) -> Tensor:
    if len(ref) <= KNN_REFERENCE:
        return ref
    idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed + 3))[:KNN_REFERENCE]
    return ref[idx.sort().values.to(ref.device)]


def _sample_metrics(
    ref: Tensor, cand: Tensor, *, points: bool, seed: int, kid_subsets: int, kid_subset_size: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    if not points:
        # on raw 2-D points FD compares means and covariances only and KID's cubic kernel
        # moments up to the third: a fitted Gaussian matches both by construction (it would
        # "beat" the held-out data), so points get the characteristic Gaussian-kernel MMD
        out["fd"] = frechet_distance(ref, cand)
        out["kid"], out["kid_std"] = kid(ref, cand, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    knn = _knn_reference(ref, seed)
    out["precision"], out["recall"] = precision_recall(knn, cand, k=3)
    out["density"], out["coverage"] = density_coverage(knn, cand, k=5)
    if points:
        out["mmd"] = mmd(ref, cand)
    return out


def _gaussian_fit(train: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and the centred, scaled rows C (N, D) with covariance C^T C (float64)."""
    x = train.flatten(1).double()
    mu = x.mean(0)
    return mu, (x - mu) / math.sqrt(max(x.shape[0] - 1, 1))


def _gaussian_nll(train: Tensor, test: Tensor, image: bool, bins: int, g: torch.Generator) -> dict[str, float]:
    """NLL of a full-covariance Gaussian fitted to the train data, on the test data.

    Images: the Gaussian of the dequantised data y = x (bins - 1) / bins + u / bins, whose
    moments follow exactly from x's (covariance + I / (12 bins^2): always positive
    definite), evaluated at dequantised test points (one seeded draw of u).
    """
    mu, cov = feature_moments(train.flatten(1))
    x = test.flatten(1).double()
    if image:
        a = (bins - 1) / bins
        mu = a * mu + 0.5 / bins
        cov = a * a * cov + torch.eye(cov.shape[0], dtype=cov.dtype) / (12 * bins * bins)
        x = dequantize(test, bins, generator=g).flatten(1).double()
    lp = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov).log_prob(x)
    nll = float(-lp.mean())
    out = {"nll": nll, "nll_se": float(lp.std() / math.sqrt(len(lp)))}
    if image:
        out["nll_bpd"] = float(bits_per_dim(nll, x.shape[1], bins=bins))
    return out


def evaluate(
    model: Any,
    data: Data | str,
    *,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
    features: str | Callable[[Tensor], Tensor] = "auto",
    bins: int | None = None,
    n_reference: int | None = None,
    iwae_k: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, Any]:
    """Score ``model`` on ``data`` -> {metric: float, "baseline_data": {...}, "baseline_gaussian": {...}, ...}.

    ``model``: any object with ``sample(n, *, seed=None) -> (n, *data.shape)`` in the data's
    range (``offset=`` is used when sample() takes it; super-resolution data also passes
    ``low_res=`` (n, 3, h, w) inputs); optionally ``log_prob(x) -> (B,)`` (exact) or
    ``log_likelihood(x, k=iwae_k) -> (B,)`` (IWAE bound, given ``seed=`` and the examples'
    ``offset=`` when it takes them), called only when present; a class-conditional model
    (``config["num_classes"]``) gets the test labels as ``labels=``. ``None``
    scores the baselines only. ``data``: what :func:`pygen.data.load` returns, or its spec.

    Sets: reference = the train split (digits: the fixed split; toy2d: 10000 points; files:
    the seeded 80%), its first ``n_reference`` examples when given (the pairwise metrics
    cost O(n_reference * n)). Candidates of n examples each (default n = the test split's
    size; toy2d: test points are drawn at size n): model samples, the test split
    (``baseline_data``, capped at its size), Gaussian samples (``baseline_gaussian``).
    Sample metrics in the :func:`feature_space` ("auto": DigitsFeatures for digits, the
    points for 2-D data, flattened pixels for other images): images get fd, kid / kid_std,
    precision / recall (k=3), density / coverage (k=5); points get precision, recall,
    density, coverage and mmd (not fd / kid: on raw points they compare only low moments,
    which the fitted Gaussian matches by construction).

    Super-resolution data (``data.low_res`` set, "patches"): the model gets the test inputs
    (``low_res=``); the reference is the test targets, since train and test come from different
    image regions (their distributions differ: the train split would make a poor floor);
    ``baseline_data`` is then the targets themselves (the ideal values at this n); "psnr"
    (dB, mean over images, higher is better) compares each output with its target, and
    ``baseline_bicubic`` up-samples the inputs bicubically.

    Likelihood (when the model has one), on the test split: "nll" (nats per example, mean)
    and "nll_se"; images are dequantised first (:func:`pygen.flows.dequantize`, ``bins``
    levels, default: the model's ``config["bins"]`` when it has one, else
    :attr:`pygen.data.Data.bins`: 17 for the digits at any size, 256 for other images) and "nll_bpd"
    follows :func:`bits_per_dim`. The Gaussian baseline reports the same; ``baseline_data``
    reports the exact NLL of the true density for the toy sets that have one.
    ``meta`` says what was compared (strings and ints); every metric is a plain float.
    """
    if isinstance(data, str):
        data = load(data)
    train, test = train_test(data, seed=seed)
    if n_reference is not None:  # before reading: a lazy folder decodes only these
        if n_reference < 6:
            raise ValueError(f"n_reference must be >= 6 (k-NN radii with k=5), got {n_reference}")
        train = Data(take(train.source, slice(0, n_reference)), None, train.name, "train")
    # compact (uint8, memory-mapped) images read as float32 once, not at every use below
    train, test = (dataclasses.replace(d, source=d.data) for d in (train, test))
    if train.name in TOY2D and n is not None:
        test = Data(toy2d(train.name, n, seed=seed + _TOY_TEST_SEED), None, train.name, "test")
    n = len(test) if n is None else int(n)
    if n < 4:  # recall's k-NN radii over the n candidates use k = 3
        raise ValueError(f"n must be >= 4 (recall's k-NN radii over the samples use k = 3), got {n}")
    sr = test.low_res is not None
    if sr and n > len(test):
        raise ValueError(f"super-resolution data: n must be <= {len(test)} (the test inputs), got {n}")
    floor = test.data[:n]
    image = data.kind == "image"
    if bins is None:  # the model's own quantisation (a flow's config), else the data's rule
        bins = (getattr(model, "config", None) or {}).get("bins") or train.bins or 256
    space, feat = feature_space(train, features)
    device = model_device(model)
    kw = dict(points=space == "points", seed=seed, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    ref = feat((test.data[:n] if sr else train.data).to(device))

    def score(x: Tensor, with_psnr: bool = True) -> dict[str, float]:
        out = _sample_metrics(ref, feat(x.to(device)), **kw)
        if sr and with_psnr:
            out["psnr"] = psnr(x, test.data[: x.shape[0]].to(x.device))
        return out

    results: dict[str, Any] = {}
    meta: dict[str, Any] = {"data": train.name, "n": n, "n_reference": len(ref),
                            "n_reference_knn": min(len(ref), KNN_REFERENCE), "n_floor": len(floor),
                            "feature_space": space, "reference": "test targets" if sr else "train split", "seed": seed}
    if model is not None:
        cond = {"low_res": test.low_res[:n].to(device)} if sr else {}
        x = _sample(model, n, seed, batch_size, **cond)
        want = (n, *train.shape)
        if not isinstance(x, Tensor) or tuple(x.shape) != want:
            got = tuple(getattr(x, "shape", ()))
            raise ValueError(f"model.sample({n}) must return a tensor of shape {want}, got {got}")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"model.sample({n}) returned non-finite values ({bad} of {x.numel()})")
        results.update(score(x))
        test_labels = None if test.labels is None else test.labels.to(device)
        found = _likelihood_fn(model, iwae_k, seed, test_labels)
        if found is not None:
            lp_fn, meta["nll_method"] = found
            y = test.data
            if image:
                y = dequantize(y, bins, generator=torch.Generator().manual_seed(seed + 2))
                meta["bins"] = bins
            mean, se = dataset_log_likelihood(lp_fn, y.to(device), batch_size, indexed=True)
            results["nll"], results["nll_se"] = -mean, se
            if image:
                results["nll_bpd"] = float(bits_per_dim(-mean, math.prod(train.shape), bins=bins))

    results["baseline_data"] = score(floor, with_psnr=False)
    if train.name in TOY2D_DENSITIES:
        lp = toy2d_log_prob(train.name, test.data).double()
        results["baseline_data"].update(nll=float(-lp.mean()), nll_se=float(lp.std() / math.sqrt(len(lp))))

    # the Gaussian bar: x = mu + C^T z / ... has covariance C^T C exactly, with no D x D factorisation
    g = torch.Generator().manual_seed(seed + 1)
    mu, c = _gaussian_fit(train.data)
    z = torch.randn(n, c.shape[0], generator=g, dtype=torch.float64)
    gx = (mu + z @ c).reshape(n, *train.shape)
    flat = train.data.flatten(1).double()
    lo, hi = (0.0, 1.0) if image else (flat.min(0).values, flat.max(0).values)
    gx = torch.clamp(gx.flatten(1), lo, hi).reshape(gx.shape).float()
    results["baseline_gaussian"] = score(gx)
    if model is not None and "nll" in results:
        g2 = torch.Generator().manual_seed(seed + 2)  # the same dequantisation noise as the model's
        results["baseline_gaussian"].update(_gaussian_nll(train.data, test.data, image, bins, g2))
    if sr:
        up = F.interpolate(test.low_res[:n], size=train.shape[1:], mode="bicubic", align_corners=False).clamp(0, 1)
        results["baseline_bicubic"] = score(up)
    results["meta"] = meta
    return results


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of :func:`evaluate`'s results: one row per metric, one column per set."""
    cols = [("model", {k: v for k, v in results.items() if not isinstance(v, dict)})]
    names = {
        "baseline_data": "held-out data (floor)",
        "baseline_gaussian": "Gaussian (bar)",
        "baseline_bicubic": "bicubic",
    }
    cols += [(label, results[key]) for key, label in names.items() if key in results]
    keys = [k for k in METRICS if any(k in c for _, c in cols)]
    keys += sorted({k for _, c in cols for k in c} - set(keys))
    lines = ["| metric | better | " + " | ".join(label for label, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for k in keys:
        cells = [f"{c[k]:.4g}" if isinstance(c.get(k), (int, float)) else "" for _, c in cols]
        lines.append(f"| {k} | {METRICS.get(k, ('', ''))[1]} | " + " | ".join(cells) + " |")
    meta = results.get("meta", {})
    if meta:
        lines.append("")
        lines.append("; ".join(f"{k}: {v}" for k, v in meta.items()))
    return "\n".join(lines)
