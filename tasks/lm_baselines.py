"""Language-model baselines over the tokenizer's word pieces: an interpolated Kneser-Ney bigram model.

Pure functions and a small class; reads and writes nothing (the ``lm_baselines`` stage, issue 9,
will feed it the corpus's train and held-out splits as word-piece ids and report perplexities
beside BERT's held-out MLM figures). A sequence is one sentence's ids; the model predicts each
piece and the end of the sentence from the piece before it, the first from the sentence start.

Interpolated Kneser-Ney with one discount ``d`` (Chen & Goodman 1998):

    P(w | v) = max(c(v, w) − d, 0) / c(v) + d · N1+(v •) / c(v) · P_cont(w)
    P_cont(w) = max(N1+(• w) − d, 0) / N1+(• •) + d · |{w : N1+(• w) > 0}| / N1+(• •) · 1 / |V|

where N1+(v •) counts the distinct words seen after v, N1+(• w) the distinct words seen before w,
N1+(• •) the distinct bigrams, and |V| the vocabulary (with the end symbol): every piece of the
vocabulary gets a probability above zero, and each distribution sums to one. A context never seen
(c(v) = 0) falls back to P_cont.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

START, END = -1, -2  # sentence boundary symbols, outside any tokenizer's id range


def bigrams(sequence: Sequence[int]) -> list[tuple[int, int]]:
    """(previous, next) pairs of one sentence, with its start and end symbols."""
    symbols = [START, *sequence, END]
    return list(zip(symbols[:-1], symbols[1:], strict=True))


class KneserNeyBigram:
    """Interpolated Kneser-Ney bigram model over ``vocab_size`` word pieces (plus the end symbol)."""

    def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int, discount: float = 0.75):
        if not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.discount = discount
        self.vocabulary = vocab_size + 1  # the pieces and the end symbol
        self.pair_counts: Counter = Counter()
        for sequence in sequences:
            self.pair_counts.update(bigrams(sequence))
        if not self.pair_counts:
            raise ValueError("no training sequences: the bigram model needs at least one")
        self.context_counts: Counter = Counter()
        self.followers: Counter = Counter()  # N1+(v •)
        self.predecessors: Counter = Counter()  # N1+(• w)
        for (previous, following), count in self.pair_counts.items():
            self.context_counts[previous] += count
            self.followers[previous] += 1
            self.predecessors[following] += 1
        self.distinct_pairs = len(self.pair_counts)  # N1+(• •)

    def continuation(self, word: int) -> float:
        d, pairs = self.discount, self.distinct_pairs
        return (max(self.predecessors[word] - d, 0.0) / pairs
                + d * len(self.predecessors) / pairs / self.vocabulary)

    def probability(self, word: int, previous: int) -> float:
        context = self.context_counts[previous]
        if context == 0:
            return self.continuation(word)
        d = self.discount
        return (max(self.pair_counts[(previous, word)] - d, 0.0) / context
                + d * self.followers[previous] / context * self.continuation(word))

    def log_likelihood(self, sequences: Iterable[Sequence[int]]) -> tuple[float, int]:
        """(sum of natural-log probabilities, number of predicted symbols, end symbols included)."""
        total, count = 0.0, 0
        for sequence in sequences:
            for previous, word in bigrams(sequence):
                total += math.log(self.probability(word, previous))
                count += 1
        return total, count

    def perplexity(self, sequences: Iterable[Sequence[int]]) -> float:
        total, count = self.log_likelihood(sequences)
        if count == 0:
            raise ValueError("no sequences to score")
        return math.exp(-total / count)


def context_distribution(model: KneserNeyBigram, previous: int, vocab_size: int) -> dict[int, float]:
    """P(· | previous) over every piece and the end symbol (for checks: it sums to one)."""
    return {word: model.probability(word, previous) for word in [*range(vocab_size), END]}

