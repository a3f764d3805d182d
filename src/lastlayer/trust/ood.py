""" "None of the above": how far an image's features are from every training class.

The score is a class-conditional Mahalanobis distance (Lee et al., 2018) in the standardized feature
space: ``min_c (z - mu_c)^T P (z - mu_c) / D``, with ``z`` the standardized features, ``mu_c`` the
class means and ``P`` the inverse of the pooled within-class covariance. With fewer images than
features that covariance is singular, so it is the top ``r`` principal directions plus the
Ledoit-Wolf shrinkage (``Sigma = U diag(s) U^T + a I``, a probabilistic-PCA covariance), whose
inverse is ``(I - G G^T) / a`` with ``G = U sqrt(s / (s + a))``: the score is a few matrix products
(:func:`onnx_nodes`) and the exported model carries ``D x r`` numbers, not ``D x D``. Chosen by
measurement over the max-softmax probability and the 5-nearest-neighbour cosine distance
(``benchmarks/bench_trust.py``, docs/benchmarks.md): as good as the latter here, and its size does
not grow with the training set.

The threshold is a quantile of the scores of held-out in-distribution images (the validation split):
the training images' own scores are lower (they made the statistics), so a threshold taken from them
would flag most new flowers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from lastlayer.model import contract
from lastlayer.training.train import Standardizer

#: Principal directions kept at most (the model carries ``D x MAX_COMPONENTS`` float32).
MAX_COMPONENTS = 256


@dataclass(frozen=True)
class Distance:
    """The fitted score: ``min_c (|v_c|^2 - |v_c G|^2) / (a D)`` with ``v_c = (x - mean) * scale - mu_c``.

    Attributes:
        standardizer: the training split's mean and scale ``[D]``.
        centres: ``float32 [C, D]`` class means of the standardized features.
        directions: ``float32 [D, r]`` ``G``, the principal directions shrunk by their variance.
        shrinkage: ``a``, the isotropic variance added (> 0).
    """

    standardizer: Standardizer
    centres: np.ndarray
    directions: np.ndarray
    shrinkage: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``float32 [N]`` scores of raw features ``x`` ``[N, D]`` (as the exported model computes them)."""
        z = self.standardizer(x)
        q = z @ self.directions
        own = np.einsum("nd,nd->n", z, z) - np.einsum("nr,nr->n", q, q)
        cross, constant = self._cross()
        d2 = own[:, None] + z @ cross + constant
        return (d2.min(axis=1) / (self.shrinkage * z.shape[1])).astype(np.float32)

    def _cross(self) -> tuple[np.ndarray, np.ndarray]:
        """``A [D, C] = -2 (I - G G^T) mu^T`` and ``[C]`` ``|mu_c|^2 - |mu_c G|^2``: the class terms."""
        mg = self.centres @ self.directions
        projected = self.centres - mg @ self.directions.T
        constant = np.einsum("cd,cd->c", self.centres, self.centres) - np.einsum("cr,cr->c", mg, mg)
        return (-2 * projected.T).astype(np.float32), constant.astype(np.float32)


@dataclass(frozen=True)
class ExportedDistance:
    """What the exported model carries: the score and its metadata (output name, threshold, word)."""

    distance: Distance
    meta: contract.Unknown


def _ledoit_wolf(xc: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Shrinkage intensity and the eigenpairs of the covariance of centred rows ``xc`` ``[n, D]``:
    ``(rho, eigenvalues [k], eigenvectors [D, k])``, from the ``n x n`` Gram matrix when ``n < D``.
    Ledoit and Wolf (2004), written out because lastlayer does not depend on scikit-learn."""
    n, d = xc.shape
    x = xc.astype(np.float64)
    if n < d:
        gram = x @ x.T / n
        values, vectors = np.linalg.eigh(gram)
        keep = values > 1e-10 * max(values.max(), 1e-30)
        values, vectors = values[keep], x.T @ vectors[:, keep] / np.sqrt(n * values[keep])
        frobenius = float(np.sum(gram**2))
    else:
        cov = x.T @ x / n
        values, vectors = np.linalg.eigh(cov)
        frobenius = float(np.sum(cov**2))
    mu = float(np.sum(x**2) / n / d)
    delta = (frobenius - d * mu**2) / d
    beta = (float(np.sum(np.sum(x**2, axis=1) ** 2)) / n - frobenius) / (n * d)
    rho = 1.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    return rho * mu, (1 - rho) * values, vectors


def fit(x: np.ndarray, labels: np.ndarray, n_classes: int, components: int = MAX_COMPONENTS) -> Distance:
    """The score of the training features ``x`` ``float32 [N, D]`` of classes ``labels`` ``[N]``."""
    standardizer = Standardizer.of(x)
    z = standardizer(x)
    counts = np.bincount(labels, minlength=n_classes)
    sums = np.zeros((n_classes, z.shape[1]))
    np.add.at(sums, labels, z)
    centres = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    shrinkage, values, vectors = _ledoit_wolf(z - centres[labels])
    top = np.argsort(values)[::-1][:components]
    shrinkage = max(shrinkage, 1e-6)
    weight = np.sqrt(values[top] / (values[top] + shrinkage))
    return Distance(standardizer, centres, (vectors[:, top] * weight).astype(np.float32), shrinkage)


def threshold(held_out: np.ndarray, recall: float) -> float:
    """The score below which a share ``recall`` (0..1) of the held-out in-distribution scores lie."""
    return float(np.quantile(held_out.astype(np.float64), recall, method="inverted_cdf"))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Area under the ROC curve of telling ``outside`` scores (higher) from ``inside`` ones: the
    chance that a random outside image scores above a random inside one (ties count half)."""
    scores = np.concatenate([inside, outside]).astype(np.float64)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    ranks = (sums / counts)[inverse]  # tied scores share their mean rank
    n_out = len(outside)
    return float((ranks[len(inside) :].sum() - n_out * (n_out + 1) / 2) / (len(inside) * n_out))


def onnx_nodes(distance: Distance, features: str, output: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """The nodes and initializers computing ``output`` ``float32 [N]`` (:meth:`Distance.__call__`)
    from ``features`` ``float32 [N, D]`` (opset 17)."""
    s = distance.standardizer
    cross, constant = distance._cross()
    d = len(s.mean)
    tensors = {
        "ood_scale": s.scale,
        "ood_offset": (-s.mean * s.scale).astype(np.float32),
        "ood_directions": distance.directions,
        "ood_cross": cross,
        "ood_constant": constant,
        "ood_divisor": np.array(distance.shrinkage * d, np.float32),
    }
    nodes = [
        helper.make_node("Mul", [features, "ood_scale"], ["ood_scaled"]),
        helper.make_node("Add", ["ood_scaled", "ood_offset"], ["ood_z"]),
        helper.make_node("MatMul", ["ood_z", "ood_directions"], ["ood_q"]),
        helper.make_node("ReduceSumSquare", ["ood_z"], ["ood_zz"], axes=[1], keepdims=1),
        helper.make_node("ReduceSumSquare", ["ood_q"], ["ood_qq"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["ood_zz", "ood_qq"], ["ood_own"]),
        helper.make_node("Gemm", ["ood_z", "ood_cross", "ood_constant"], ["ood_class_terms"]),
        helper.make_node("Add", ["ood_own", "ood_class_terms"], ["ood_d2"]),
        helper.make_node("ReduceMin", ["ood_d2"], ["ood_nearest"], axes=[1], keepdims=0),
        helper.make_node("Div", ["ood_nearest", "ood_divisor"], [output]),
    ]
    return nodes, [numpy_helper.from_array(v, k) for k, v in tensors.items()]
