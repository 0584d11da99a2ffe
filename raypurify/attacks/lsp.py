"""LSP, linear-separable synthetic perturbations (Yu et al., KDD 2022).

Every class owns a Gaussian cluster in R^d, d = ceil(H/patch) * ceil(W/patch) * C (48 at 32 px
with 8-px patches), laid out like sklearn's ``make_classification(n_informative=d,
class_sep=10, n_clusters_per_class=1)``, which the original calls: centres on distinct
vertices of the hypercube [-class_sep, class_sep]^d, points N(0, I) @ A_c + centre_c with A_c
uniform in [-1, 1]^(d x d). Each class-c image gets its own point, reshaped to a grid of
patch values, nearest-upsampled to the image, scaled to l2 = eps and added. The clusters are
far apart, so the perturbations are linearly separable by class: a shortcut a network learns
instead of the images.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.errors import ConfigError


class LSPConfig(EpsConfig):
    eps: float = Field(1.0, gt=0, description="l2 norm of every perturbation, [0, 1] units")
    patch: PositiveInt = Field(8, description="side in pixels of one perturbation value")
    class_sep: float = Field(10.0, gt=0, description="half the side of the centres' hypercube")


def hypercube_centres(rng: np.random.Generator, k: int, d: int, sep: float) -> np.ndarray:
    """(k, d) distinct random vertices of [-sep, sep]^d."""
    if k > 2**d:
        raise ConfigError(f"lsp: {k} classes need more than the 2^{d} vertices of a {d}-cube")
    vertices: dict[bytes, np.ndarray] = {}
    while len(vertices) < k:
        v = rng.integers(0, 2, size=d)
        vertices.setdefault(v.tobytes(), v)
    return sep * (2.0 * np.stack(list(vertices.values())) - 1.0)


def cluster_points(
    labels: np.ndarray, num_classes: int, d: int, sep: float, seed: int
) -> np.ndarray:
    """(n, d) one point per row, drawn from its class's cluster."""
    rng = np.random.default_rng(seed)
    centres = hypercube_centres(rng, num_classes, d, sep)
    points = np.empty((len(labels), d))
    for c in range(num_classes):  # one d x d mixing matrix at a time: 44 MB at 224 px
        mixing = rng.uniform(-1.0, 1.0, size=(d, d))
        rows = np.flatnonzero(labels == c)
        points[rows] = rng.standard_normal((len(rows), d)) @ mixing + centres[c]
    return points


def generate(job: AttackJob, cfg: LSPConfig) -> np.ndarray:
    h, w, channels = job.rows.shape
    grid_h, grid_w = -(-h // cfg.patch), -(-w // cfg.patch)
    d = grid_h * grid_w * channels
    points = cluster_points(job.rows.labels, job.clean.num_classes, d, cfg.class_sep, cfg.seed)
    points = torch.from_numpy(points.astype(np.float32)).view(-1, grid_h, grid_w, channels)

    def delta_for(rows: slice) -> torch.Tensor:
        up = points[rows].repeat_interleave(cfg.patch, 1).repeat_interleave(cfg.patch, 2)
        up = up[:, :h, :w]
        return up * (cfg.eps / up.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)

    return perturb(job.rows.images, delta_for, "l2", cfg.eps, job.device)


ATTACK = Attack(
    name="lsp",
    description="linear-separable synthetic patches, class-wise clusters (l2 = 1.0)",
    norm="l2",
    config=LSPConfig,
    generate=generate,
)
