"""Language-model baselines over the tokenizer's word pieces: a Kneser-Ney bigram model and an LSTM LM.

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

import torch
import torch.nn.functional as F

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



# ---------------------------------------------------------------- the LSTM language model (h_t = f(h_{t-1}, x_t))


def lstm_batch(sequences: Sequence[Sequence[int]], vocab_size: int):
    """Inputs [start, w1 … wn] and targets [w1 … wn, end] as padded tensors (targets padded with −100).

    The start symbol is input id ``vocab_size``; the end symbol is output class ``vocab_size``.
    """
    width = max(len(s) for s in sequences) + 1
    inputs = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        inputs[row, : len(sequence) + 1] = torch.tensor([vocab_size, *sequence])
        targets[row, : len(sequence) + 1] = torch.tensor([*sequence, vocab_size])
    return inputs, targets


class LstmLanguageModel(torch.nn.Module):
    """Embedding (pieces + the start symbol) → LSTM → linear over the pieces and the end symbol."""

    def __init__(self, vocab_size: int, embedding: int, hidden: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size + 1, embedding)
        self.lstm = torch.nn.LSTM(embedding, hidden, layers, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab_size + 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.embed(inputs))[0])


def lstm_model(vocab_size: int, embedding: int = 128, hidden: int = 256, layers: int = 1,
               seed: int = 0) -> LstmLanguageModel:
    torch.manual_seed(seed)
    return LstmLanguageModel(vocab_size, embedding, hidden, layers)


def lstm_loss(model, sequences: Sequence[Sequence[int]], vocab_size: int, reduction: str = "mean"):
    inputs, targets = lstm_batch(sequences, vocab_size)
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def train_lstm(model, sequences: Sequence[Sequence[int]], vocab_size: int, steps: int, batch_size: int = 32,
               learning_rate: float = 2e-3, seed: int = 0) -> list[float]:
    """Adam over random batches of sentences for ``steps`` steps; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(sequences), (min(batch_size, len(sequences)),), generator=generator).tolist()
        loss = lstm_loss(model, [sequences[i] for i in rows], vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def lstm_perplexity(model, sequences: Sequence[Sequence[int]], vocab_size: int, batch_size: int = 64) -> float:
    """exp(mean negative log-likelihood) over every predicted piece and end symbol."""
    if not sequences:
        raise ValueError("no sequences to score")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            total += float(lstm_loss(model, chunk, vocab_size, reduction="sum"))
            count += sum(len(s) + 1 for s in chunk)
    return math.exp(total / count)
