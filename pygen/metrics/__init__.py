"""Quality indicators for generative models: likelihoods, sample quality, a digits feature net.

>>> from pygen.metrics import evaluate, format_table
>>> print(format_table(evaluate(model, "digits")))   # model: anything with sample(n, *, seed)

Sample metrics take (N, D) features (real first) and return floats; see each function for
what a better value is. :func:`evaluate` reports them beside two baselines (the held-out
data: the floor; a fitted Gaussian: the bar).
"""

from pygen.metrics.evaluate import METRICS, evaluate, feature_space, format_table
from pygen.metrics.features import DigitsFeatures, FashionFeatures
from pygen.metrics.restoration import pairwise_diversity, psnr, ssim
from pygen.metrics.likelihood import bits_per_dim, dataset_log_likelihood, logmeanexp
from pygen.metrics.vae import (
    active_units,
    aggregate_posterior_mismatch,
    aggregate_posterior_samples,
    elbo_terms,
    encode_dataset,
    gaussian_kl_to_prior,
    image_variance,
    kl_per_dim,
    latent_report,
    posterior_mean_variance,
    variance_loss,
)
from pygen.metrics.sample_quality import (
    density_coverage,
    feature_moments,
    frechet_distance,
    frechet_distance_from_moments,
    kid,
    mmd,
    precision_recall,
)

__all__ = [
    "psnr",
    "ssim",
    "pairwise_diversity",
    "logmeanexp",
    "bits_per_dim",
    "dataset_log_likelihood",
    "feature_moments",
    "frechet_distance",
    "frechet_distance_from_moments",
    "kid",
    "precision_recall",
    "density_coverage",
    "mmd",
    "DigitsFeatures",
    "FashionFeatures",
    "evaluate",
    "feature_space",
    "format_table",
    "METRICS",
    # the VAE's four problems, measured
    "active_units",
    "kl_per_dim",
    "latent_report",
    "posterior_mean_variance",
    "aggregate_posterior_mismatch",
    "aggregate_posterior_samples",
    "gaussian_kl_to_prior",
    "variance_loss",
    "image_variance",
    "elbo_terms",
    "encode_dataset",
]
