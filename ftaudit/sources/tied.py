"""An output head stored beside the input embedding it is tied to, read as transformers loads it.

config.json's `tie_word_embeddings` makes a model's lm_head and its input embedding one parameter. transformers saves
it once, under the embedding's name; its pickles, and some other tools, store it under both names. Loading such a
checkpoint, transformers (5) ties the two where their values are equal, and keeps two parameters where they differ,
saying so. ftaudit reads a checkpoint alike: an equal copy is the embedding itself, no matrix of its own (neither
changed nor missing), unless the other side of the audit has an untied head to compare it with. A side that stores
no head, its embedding tied, is read with the embedding as its head, where the other side has an untied head to
compare with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ftaudit.pairing import input_embeddings
from ftaudit.sources.checkpoint import Checkpoint
from ftaudit.sources.pickled import PickleCheckpoint
from ftaudit.sources.safetensors import TensorInfo

log = logging.getLogger("ftaudit")

FIRST_COMPARED = 64 * 1024
"""Bytes of a head and of its embedding compared first: a head of its own differs there, read over the network maybe."""
COMPARED_BYTES = 64 * 1024 * 1024
"""Bytes of a head and of its embedding compared at a time, at most: pieces grow from FIRST_COMPARED to this."""
TIED_HEADS = ("lm_head",)
"""Output heads that a model with tie_word_embeddings shares with its input embedding."""


def is_head(name: str) -> bool:
    """Whether tensor `name` is the weight of an output head that tie_word_embeddings ties (TIED_HEADS)."""
    return name.endswith(".weight") and name.removesuffix(".weight").rpartition(".")[2] in TIED_HEADS


def stored_copies(weights: Checkpoint | PickleCheckpoint, tied: bool | None, label: str) -> dict[str, str]:
    """The output heads that `weights` store beside the one input embedding of their shape that config.json ties them
    to (`tied`), with its values and dtype: each head's embedding. A head of other values is said to be loaded as a
    matrix of its own. Where config.json does not say (`tied` None: transformers 4 leaves tie_word_embeddings out
    where it is its PretrainedConfig's default, true), an equal copy is the embedding too, and a head of other values,
    a matrix of its own, is not said to be."""
    infos = weights.infos
    heads = [n for n in sorted(infos) if is_head(n) and len(infos[n].shape) == 2] if tied is not False else []
    copies: dict[str, str] = {}
    for head in heads:
        found = input_embeddings(infos, (infos[head].shape[0], infos[head].shape[1]))
        if len(found) != 1:
            continue
        embedding = found[0]
        if infos[head].dtype == infos[embedding].dtype and _same_bytes(weights, head, embedding):
            copies[head] = embedding
        elif tied:
            log.warning("%s: config.json ties %s to %s (tie_word_embeddings), but the two are stored with different "
                        "values: they are audited as two matrices, as transformers loads them", label, head, embedding)
    return copies


def _same_bytes(weights: Checkpoint | PickleCheckpoint, a: str, b: str) -> bool:
    """Whether tensors `a` and `b` (of one shape and dtype) are stored with the same bytes, compared a piece at a time,
    each twice the last (FIRST_COMPARED up to COMPARED_BYTES): no whole copy of either is held, and a head of its own
    differs in the first, small piece."""
    size = weights.stored_size(a)
    if size != weights.stored_size(b):
        return False
    start, piece = 0, FIRST_COMPARED
    while start < size:
        length = min(piece, size - start)
        if weights.read_stored(a, start, length) != weights.read_stored(b, start, length):
            return False
        start, piece = start + length, min(2 * piece, COMPARED_BYTES)
    return True


def tie_copies(weights: Checkpoint | PickleCheckpoint, copies: dict[str, str], untied: bool) -> None:
    """Read each head of `copies` as its embedding (Checkpoint.tie), unless the other side of the audit has an
    untied head (`untied`), which each is compared with as stored."""
    for head, embedding in copies.items() if not untied else ():
        weights.tie(head, embedding)


def embedding_heads(weights: Checkpoint | PickleCheckpoint, other: dict[str, TensorInfo], tied: bool | None
                    ) -> dict[str, str]:
    """Read each output head that the other side of the audit stores as its own (`other`) and `weights`, tied to
    their input embedding (`tied`, true or unsaid), do not store, as the one input embedding of its width, which
    transformers loads as that head (Checkpoint.alias): by head, its embedding."""
    infos = weights.infos
    if tied is False or any(is_head(name) for name in infos):
        return {}
    heads: dict[str, str] = {}
    for head in sorted(n for n in other if is_head(n) and len(other[n].shape) == 2):
        found = input_embeddings(infos, (None, other[head].shape[1]))
        if len(found) == 1:
            weights.alias(head, found[0])
            heads[head] = found[0]
    return heads


def tied_head_entries(side: str, heads: dict[str, str]) -> tuple[dict[str, str], ...]:
    """The report's `tensors.tied_heads` entries for the heads (`embedding_heads`) that `side` reads as embeddings."""
    return tuple({"name": head, "side": side, "embedding": embedding} for head, embedding in heads.items())


def own_heads(names: Iterable[str], copies: dict[str, str]) -> bool:
    """Whether tensors `names` hold an output head that is not a copy of its embedding."""
    return any(is_head(name) and name not in copies for name in names)
