"""Next-sentence-prediction pairs with create_pretraining_data.py's semantics, and single segments without them.

Pure: documents of token ids in, ``[CLS] A [SEP] B [SEP]`` instances out, with an explicit ``random.Random``.
B is A's continuation half of the time, otherwise text from another document (label 1). Without
next-sentence prediction (``pretrain_data.next_sentence: false``) ``create_segments_from_document`` packs
a document's contiguous sentences into ``[CLS] text [SEP]`` instances (RoBERTa's packing, inside one document).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from bertflow.tokenization import Document


@dataclass(frozen=True)
class PairSpec:
    cls_id: int
    sep_id: int
    max_seq_length: int
    short_seq_prob: float


@dataclass
class Instance:
    input_ids: list[int]
    token_type_ids: list[int]
    is_random_next: bool


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer side, at random from the front or the back, until the pair fits."""
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def random_other_document(documents: Sequence[Document], index: int, rng: random.Random) -> Document:
    """A document other than ``index`` (never the same one, unlike the reference's 10 tries)."""
    other = rng.randrange(len(documents) - 1)
    return documents[other + 1 if other >= index else other]


def create_instances_from_document(documents: Sequence[Document], index: int, spec: PairSpec,
                                   rng: random.Random) -> list[Instance]:
    """Pairs from one document, as create_pretraining_data.py builds them.

    One deviation: a chunk of a single segment is split inside that segment when B should be the
    true continuation; the reference always makes such chunks random-next, which pulls the NSP
    positive rate below 50 %.
    """
    document = documents[index]
    max_tokens = spec.max_seq_length - 3
    target = rng.randint(2, max_tokens) if rng.random() < spec.short_seq_prob else max_tokens
    instances: list[Instance] = []
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            tokens_a, tokens_b, is_random, unused = _split_chunk(documents, index, chunk, target, rng)
            i -= unused
            truncate_pair(tokens_a, tokens_b, max_tokens, rng)
            if tokens_a and tokens_b:
                instances.append(_assemble(tokens_a, tokens_b, is_random, spec))
            chunk, length = [], 0
        i += 1
    return instances


def _split_chunk(documents, index, chunk, target, rng) -> tuple[list[int], list[int], bool, int]:
    """(A, B, is_random_next, segments to put back) for one chunk."""
    flat_single = len(chunk) == 1
    a_end = 1 if flat_single else rng.randint(1, len(chunk) - 1)
    if rng.random() < 0.5:
        tokens_a = [t for segment in chunk[:a_end] for t in segment]
        tokens_b: list[int] = []
        other = random_other_document(documents, index, rng)
        for segment in other[rng.randrange(len(other)):]:
            tokens_b.extend(segment)
            if len(tokens_b) >= target - len(tokens_a):
                break
        return tokens_a, tokens_b, True, len(chunk) - a_end
    if flat_single:  # true continuation inside the one segment
        segment = chunk[0]
        if len(segment) < 2:
            return list(segment), [], False, 0
        cut = rng.randint(1, len(segment) - 1)
        return segment[:cut], segment[cut:], False, 0
    tokens_a = [t for segment in chunk[:a_end] for t in segment]
    tokens_b = [t for segment in chunk[a_end:] for t in segment]
    return tokens_a, tokens_b, False, 0


def _assemble(tokens_a: list[int], tokens_b: list[int], is_random: bool, spec: PairSpec) -> Instance:
    ids = [spec.cls_id, *tokens_a, spec.sep_id, *tokens_b, spec.sep_id]
    segments = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
    return Instance(ids, segments, is_random)


def create_segments_from_document(document: Document, spec: PairSpec, rng: random.Random) -> list[Instance]:
    """One-segment instances: whole contiguous sentences packed up to the target length, all segment 0.

    The target is ``max_seq_length - 2`` word pieces, or with ``short_seq_prob`` a random length from 2
    (drawn once per document, as for pairs); a sentence longer than the target is cut into target-long pieces.
    """
    max_tokens = spec.max_seq_length - 2
    target = rng.randint(2, max_tokens) if rng.random() < spec.short_seq_prob else max_tokens
    instances: list[Instance] = []
    chunk: list[int] = []
    for sentence in document:
        for start in range(0, len(sentence), target):
            piece = sentence[start:start + target]
            if chunk and len(chunk) + len(piece) > target:
                instances.append(_single(chunk, spec))
                chunk = []
            chunk.extend(piece)
    if chunk:
        instances.append(_single(chunk, spec))
    return instances


def _single(tokens: list[int], spec: PairSpec) -> Instance:
    return Instance([spec.cls_id, *tokens, spec.sep_id], [0] * (len(tokens) + 2), False)
