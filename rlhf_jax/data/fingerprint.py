"""A short digest of the token ids a run trains on, recorded in every checkpoint: a resume
whose data file was edited in place -- the same row count, other text -- is refused instead of
continuing silently on other examples than the ones its data order was drawn for."""

from __future__ import annotations

import hashlib

import jax
import numpy as np


def fingerprint(tree) -> str:
    """The first 16 hex digits of the SHA-256 of every array in ``tree`` (token ids, masks;
    any pytree of numpy arrays, e.g. a ``TokenizedData``'s items or a list of prompts), in
    leaf order, each with its shape and dtype."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
