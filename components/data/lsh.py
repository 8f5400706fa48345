"""The arithmetic of distributed deduplication, on numpy arrays and without Ray.

The data stage's dedup steps (:mod:`components.data.shuffle`) are shuffles through storage: map
tasks route small rows by a hash to partitions, reduce tasks sort one partition and decide.
What they decide is here, so it can be tested alone:

- :func:`first_occurrences` — exact dedup: of the documents sharing (scope, hash) the one with
  the smallest stable key is kept, whichever worker saw it first.
- :func:`band_hashes` — MinHash LSH: a signature cut into ``bands`` bands of ``rows`` values,
  each band hashed to 64 bits; two documents are candidates when any band collides.
- :func:`bucket_edges` — each bucket (scope, band, band hash) with several documents becomes
  edges from its smallest key to every other member (a star: ``n − 1`` edges, not ``n²``).
- :func:`connected_components` — the duplicate clusters: every node labelled with the smallest
  key of its component; all but that one are removed. Min-label propagation with pointer
  jumping, vectorised; it converges in O(log n) rounds on the star edges above.

These follow datatrove's four MinHash steps (signatures, buckets, clusters, filter) and the
LSH → connected components → removal shape of NeMo Curator's pipeline.
"""

from __future__ import annotations

import numpy as np

__all__ = ["band_hashes", "bucket_edges", "connected_components", "first_occurrences",
           "group_starts"]

_MIX = np.uint64(0x9E3779B97F4A7C15)


def group_starts(*sorted_keys: np.ndarray) -> np.ndarray:
    """Boolean mask: row ``i`` starts a new group of equal keys (rows already sorted)."""
    n = len(sorted_keys[0])
    start = np.zeros(n, dtype=bool)
    if n:
        start[0] = True
        for key in sorted_keys:
            start[1:] |= key[1:] != key[:-1]
    return start


def first_occurrences(scope: np.ndarray, h1: np.ndarray, h2: np.ndarray,
                      key: np.ndarray) -> np.ndarray:
    """Mask of the rows kept by exact dedup: per (scope, h1, h2) the smallest ``key``."""
    order = np.lexsort((key, h2, h1, scope))
    keep = np.zeros(len(key), dtype=bool)
    keep[order] = group_starts(scope[order], h1[order], h2[order])
    return keep


def band_hashes(signatures: np.ndarray, bands: int, rows: int, seed: int = 0) -> np.ndarray:
    """``[n, bands]`` uint64: each band of each ``[n, num_perm]`` uint32 signature hashed.

    A polynomial hash with odd 64-bit multipliers drawn from ``seed``: two different bands
    collide with probability about 2⁻⁶⁴, so a collision means an equal band.
    """
    sig = np.asarray(signatures, dtype=np.uint64)
    mult = np.random.default_rng(seed).integers(1, 2**63, size=rows, dtype=np.uint64) | 1
    out = np.empty((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            part = sig[:, b * rows:(b + 1) * rows]
            h = (part * mult[None, :]).sum(axis=1, dtype=np.uint64)
            out[:, b] = (h ^ (h >> np.uint64(29))) * _MIX + np.uint64(b)
    return out


def bucket_edges(scope: np.ndarray, band: np.ndarray, bhash: np.ndarray,
                 key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges ``(u, v)``, ``u < v``, of every bucket with more than one distinct key."""
    order = np.lexsort((key, bhash, band, scope))
    s, b, h, k = scope[order], band[order], bhash[order], key[order]
    start = group_starts(s, b, h)
    group = np.cumsum(start) - 1
    first_key = k[np.flatnonzero(start)][group]
    member = (~start) & (k != first_key)
    u, v = first_key[member], k[member]
    if len(u):
        pairs = np.unique(np.stack([u, v], axis=1), axis=0)
        u, v = pairs[:, 0], pairs[:, 1]
    return u, v


def connected_components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(nodes, labels)``: every key on an edge and the smallest key of its component."""
    nodes, inverse = np.unique(np.concatenate([u, v]), return_inverse=True)
    if not len(nodes):
        return nodes, nodes.copy()
    a, b = inverse[:len(u)], inverse[len(u):]
    label = np.arange(len(nodes))  # node indices follow key order: min index = min key
    while True:
        before = label.copy()
        m = np.minimum(label[a], label[b])
        np.minimum.at(label, a, m)
        np.minimum.at(label, b, m)
        np.minimum.at(label, before, label)  # hook each old root to its new label
        while True:  # pointer jumping: follow labels to their roots
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return nodes, nodes[label]
