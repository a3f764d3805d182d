"""Near-duplicate images from their features, and the groups they form.

Two images are near-duplicates when the cosine similarity of their features (as the network gives
them) reaches :data:`THRESHOLD`, measured on planted copies (resized, recompressed, mirrored:
``benchmarks/bench_trust.py duplicates``). The search is exact and blocked, in bounded memory: the
unit rows are projected on their leading principal directions, where the distance of a pair can only
shrink (an orthogonal projection is a contraction), so every pair within ``sqrt(2 - 2 t)`` in the
projection is a candidate and no pair is missed; candidates are then checked on all features. Time
grows as ``N^2 r`` (measured at 200,000 images in docs/benchmarks.md), memory as a block of rows
times N. An index library (faiss, usearch) is not among lastlayer's dependencies, and an approximate
index may miss pairs. Exact duplicates (the same bytes) share one cache entry, hence identical
features, and are found the same way.
"""

from __future__ import annotations

import numpy as np

#: Cosine similarity of the features at or above which two images are near-duplicates.
THRESHOLD = 0.94
#: Principal directions the search prunes with.
COMPONENTS = 32
#: Bytes of one block of the search (its squared distances to every later row).
BLOCK_BYTES = 64 << 20
#: Rows the principal directions are estimated from at most.
SAMPLE_ROWS = 20000
#: Up to this many rows the search compares all features directly (cheaper than finding directions).
DIRECT_ROWS = 2048
#: Candidate pairs checked on all features at once.
CHECKED_AT_ONCE = 65536


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``float32 [N, D]``: the rows of ``x`` scaled to unit length (a zero row stays zero)."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _directions(u: np.ndarray, components: int, seed: int = 0) -> np.ndarray:
    """``float32 [D, r]``: orthonormal leading principal directions of the rows ``u`` (of at most
    :data:`SAMPLE_ROWS` of them, drawn with ``seed``), from the ``n x n`` Gram matrix when there are
    fewer rows than columns. Any orthonormal basis keeps the search exact; the leading directions
    keep the candidates few."""
    rows = u if len(u) <= SAMPLE_ROWS else u[np.random.default_rng(seed).choice(len(u), SAMPLE_ROWS, False)]
    centred = (rows - rows.mean(axis=0)).astype(np.float64)
    if len(centred) >= centred.shape[1]:
        _, vectors = np.linalg.eigh(centred.T @ centred)
        return vectors[:, ::-1][:, :components].astype(np.float32)
    values, vectors = np.linalg.eigh(centred @ centred.T)
    keep = np.argsort(values)[::-1][: min(components, int(np.sum(values > 1e-9 * max(values.max(), 1e-30))))]
    return (centred.T @ vectors[:, keep] / np.sqrt(values[keep])).astype(np.float32)


def pairs(u: np.ndarray, threshold: float = THRESHOLD, components: int = COMPONENTS) -> np.ndarray:
    """``int64 [P, 2]``: every pair ``i < j`` of the unit rows ``u`` ``[N, D]`` whose cosine reaches
    ``threshold`` (checked on all ``D`` columns)."""
    n = len(u)
    y = u if n <= DIRECT_ROWS else u @ _directions(u, min(components, u.shape[1]))
    sq = np.einsum("nr,nr->n", y, y)
    reach = 2 - 2 * threshold + 1e-5  # the squared distance of unit rows at the threshold, with slack
    block = max(1, BLOCK_BYTES // (4 * max(n, 1)))
    found = [np.zeros((0, 2), np.int64)]
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = sq[start:stop, None] + sq[None, start:] - 2 * (y[start:stop] @ y[start:].T)
        i, j = np.nonzero(d2 <= reach)
        later = j > i  # j counts from start: each pair once, never a row with itself
        candidates = np.stack([i[later] + start, j[later] + start], axis=1)
        found.append(candidates[similar(u, candidates) >= threshold])
    return np.concatenate(found)


def similar(u: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``float32 [P]``: the cosine of the unit rows of each pair ``at`` ``[P, 2]``."""
    out = np.zeros(len(at), np.float32)
    for start in range(0, len(at), CHECKED_AT_ONCE):
        a, b = at[start : start + CHECKED_AT_ONCE, 0], at[start : start + CHECKED_AT_ONCE, 1]
        out[start : start + len(a)] = np.einsum("nd,nd->n", u[a], u[b])
    return out


def groups(linked: np.ndarray) -> list[np.ndarray]:
    """The connected groups of the rows joined by the pairs ``linked`` ``[P, 2]``, each ``int64``
    sorted, the largest first (union-find with path halving, over the rows in a pair only)."""
    members = np.unique(linked)
    parent = np.arange(len(members))
    local = np.searchsorted(members, linked)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for i, j in local.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(i) for i in range(len(members))], np.int64)
    found = [members[roots == r] for r in np.unique(roots)]
    return sorted(found, key=lambda g: (-len(g), int(g[0])))
