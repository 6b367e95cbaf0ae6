"""Exact and near-duplicate detection.

Signatures are computed in worker processes (the expensive part) and shipped
as raw bytes; the decisions are taken by one process in input order, so the
result does not depend on how many workers there are.

MinHash and the LSH index come from ``datasketch``. The permutation scheme,
the seed and the shingle hash are pinned, so the Beam pipeline and the local
runner compute identical signatures and band keys on any machine.
"""

from __future__ import annotations

import hashlib
from typing import Hashable, Optional

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from kinoe_jax.corpus.config import DedupConfig
from kinoe_jax.corpus.filters import strip_whitespace

SCHEME = "affine32"
_SIGNATURE_DTYPE = np.uint32  # what the affine32 scheme stores


def exact_key(text: str) -> bytes:
    # 128 bits: collisions are negligible for any corpus size and the key
    # set stays small in memory.
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> set[bytes]:
    """Character n-grams with whitespace removed, so that re-wrapped or
    re-indented copies still match."""
    chars = strip_whitespace(text)
    if len(chars) <= n:
        return {chars.encode("utf-8")}
    return {chars[i:i + n].encode("utf-8") for i in range(len(chars) - n + 1)}


class Signer:
    """Computes MinHash signatures of texts as compact bytes."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        # Copying a prepared MinHash reuses its permutations instead of
        # regenerating them for every document. xxh32 instead of the default
        # SHA-1 makes signatures about 40% cheaper; a fast non-cryptographic
        # hash is all MinHash needs, and datasketch mixes it again anyway.
        self._template = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=SCHEME,
                                 hashfunc=xxhash.xxh32_intdigest)

    def signature(self, text: str) -> bytes:
        m = self._template.copy()
        m.update_batch(shingles(text, self.cfg.ngram_chars))
        return m.hashvalues.astype(_SIGNATURE_DTYPE, copy=False).tobytes()


def to_minhash(signature: bytes, seed: int) -> LeanMinHash:
    values = np.frombuffer(signature, dtype=_SIGNATURE_DTYPE)
    return LeanMinHash(seed=seed, hashvalues=values, scheme=SCHEME)


def estimated_jaccard(a: bytes, b: bytes, seed: int) -> float:
    return to_minhash(a, seed).jaccard(to_minhash(b, seed))


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """Chance that a pair with this Jaccard similarity shares at least one
    band of ``rows`` signature values, i.e. becomes an LSH candidate."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def lsh_params(cfg: DedupConfig) -> tuple[int, int]:
    """(bands, rows per band): rows pinned in the config, or derived from the
    threshold for recall (see ``dedup.candidate_recall`` in default_config.yaml).

    Every candidate is verified against the threshold, so a false candidate
    costs one signature comparison while a missed one leaves a duplicate in
    the corpus. The largest row count that still finds a pair sitting exactly
    at the threshold with the wanted probability keeps false candidates as
    few as recall allows.
    """
    if cfg.rows_per_band is not None:
        return cfg.num_perm // cfg.rows_per_band, cfg.rows_per_band
    rows = 1
    for r in range(1, cfg.num_perm // 2 + 1):
        if candidate_probability(cfg.threshold, cfg.num_perm // r, r) >= cfg.candidate_recall:
            rows = r
    return cfg.num_perm // rows, rows


def lsh_bands(cfg: DedupConfig) -> list[tuple[int, int]]:
    """Signature slices that form the LSH bands, in datasketch's layout."""
    bands, rows = lsh_params(cfg)
    return [(i * rows, (i + 1) * rows) for i in range(bands)]


def band_keys(signature: bytes, bands: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    values = np.frombuffer(signature, dtype=_SIGNATURE_DTYPE)
    return [(i, values[start:end].tobytes()) for i, (start, end) in enumerate(bands)]


class ExactDeduplicator:
    """Remembers the first document of each normalised text.

    Memory: one 16-byte key plus dict overhead (about 100 bytes) per kept
    document.
    """

    def __init__(self) -> None:
        self._first: dict[bytes, Hashable] = {}

    def check(self, key: bytes, doc_id: Hashable) -> Optional[Hashable]:
        """Id of the earlier identical document, or None (and remember it)."""
        first = self._first.setdefault(key, doc_id)
        return None if first == doc_id else first


class NearDeduplicator:
    """Greedy near-duplicate removal in input order.

    A document is dropped when a previously *kept* document is an LSH
    candidate whose estimated Jaccard similarity reaches the threshold;
    otherwise it is kept and indexed. Dropped documents are not indexed, so
    in a chain A~B~C with A and C dissimilar, A and C are kept.

    Memory: the datasketch index holds the band hashes of every kept
    document (one per band), and the signature (num_perm * 4 bytes) is kept
    for verifying candidates: a few KB per kept document in total.
    """

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._lsh = MinHashLSH(num_perm=cfg.num_perm, params=lsh_params(cfg))
        # The Beam runner builds its band keys from lsh_bands; both must slice
        # the signature the same way.
        assert self._lsh.hashranges == lsh_bands(cfg)
        self._signatures: dict[Hashable, LeanMinHash] = {}

    def check(self, signature: bytes, doc_id: Hashable) -> Optional[Hashable]:
        """Id of a kept near-duplicate, or None (and index the document)."""
        minhash = to_minhash(signature, self.cfg.seed)
        # Candidates come back as an unordered set; sorting makes the chosen
        # "duplicate of" reproducible.
        for other in sorted(self._lsh.query(minhash)):
            if minhash.jaccard(self._signatures[other]) >= self.cfg.threshold:
                return other
        self._lsh.insert(doc_id, minhash, check_duplication=False)
        self._signatures[doc_id] = minhash
        return None
