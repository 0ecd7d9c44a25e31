"""Language-model baselines over the tokenizer's word pieces: a Kneser-Ney bigram model and an LSTM LM.

Pure functions and small models; reads and writes nothing (the ``lm_baselines`` stage feeds them
the corpus's train and held-out splits as word-piece ids). A sequence is one sentence's ids; a
model predicts each piece and the end of the sentence from what came before it, the first piece
from the sentence start.

Interpolated Kneser-Ney with one discount ``d`` (Chen & Goodman 1998):

    P(w | v) = max(c(v, w) − d, 0) / c(v) + d · N1+(v •) / c(v) · P_cont(w)
    P_cont(w) = max(N1+(• w) − d, 0) / N1+(• •) + d · |{w : N1+(• w) > 0}| / N1+(• •) · 1 / |V|

where N1+(v •) counts the distinct words seen after v, N1+(• w) the distinct words seen before w,
N1+(• •) the distinct bigrams, and |V| the vocabulary (with the end symbol): every piece of the
vocabulary gets a probability above zero, and each distribution sums to one. A context never seen
(c(v) = 0) falls back to P_cont. Without a given discount, Ney's estimate d = n1 / (n1 + 2·n2) from
the numbers of bigrams seen once (n1) and twice (n2) in training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

START, END = -1, -2  # sentence boundary symbols, outside any tokenizer's id range


def bigrams(sequence: Sequence[int]) -> list[tuple[int, int]]:
    """(previous, next) pairs of one sentence, with its start and end symbols."""
    symbols = [START, *sequence, END]
    return list(zip(symbols[:-1], symbols[1:], strict=True))


def ney_discount(pair_counts: np.ndarray) -> float:
    """d = n1 / (n1 + 2·n2), Ney, Essen & Kneser (1994), from the distinct bigrams' counts; 0.75 when the counts
    cannot say."""
    n1, n2 = int(np.count_nonzero(pair_counts == 1)), int(np.count_nonzero(pair_counts == 2))
    estimate = n1 / (n1 + 2 * n2) if n1 and n2 else 0.75
    return min(max(estimate, 0.05), 0.95)


def boundary_pairs(sequences: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Every sentence's ``bigrams`` at once, as (previous, next) symbol arrays: one pass in numpy."""
    sequences = sequences if isinstance(sequences, list) else list(sequences)
    lengths = np.fromiter((len(sequence) for sequence in sequences), dtype=np.int64, count=len(sequences))
    pieces = np.fromiter((piece for sequence in sequences for piece in sequence), dtype=np.int64,
                         count=int(lengths.sum()))
    starts = np.cumsum(lengths + 1) - (lengths + 1)  # where each sentence's pairs begin
    previous = np.empty(len(pieces) + len(sequences), dtype=np.int64)
    following = np.empty_like(previous)
    first, last = np.zeros(len(previous), dtype=bool), np.zeros(len(previous), dtype=bool)
    first[starts], last[starts + lengths] = True, True
    previous[first], previous[~first] = START, pieces
    following[last], following[~last] = END, pieces
    return previous, following


class KneserNeyBigram:
    """Interpolated Kneser-Ney bigram model over ``vocab_size`` word pieces (plus the end symbol).

    Counts live in numpy arrays indexed by ``symbol + 2`` (END 0, START 1, piece p at p + 2, and one last entry,
    never seen, for any symbol outside the vocabulary); a pair is the code ``previous_index · stride +
    next_index``, its count found by binary search in the sorted distinct codes."""

    def __init__(self, sequences: Iterable[Sequence[int]], vocab_size: int, discount: float | None = 0.75):
        if discount is not None and not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.vocabulary = vocab_size + 1  # the pieces and the end symbol
        self.width = vocab_size + 2  # the pieces, START and END
        self.stride = self.width + 1  # the table: those and the entry for a symbol outside them
        previous, following = boundary_pairs(sequences)
        if not len(previous):
            raise ValueError("no training sequences: the bigram model needs at least one")
        self.pair_codes, self.pair_counts = np.unique(self._code(previous, following), return_counts=True)
        self.discount = ney_discount(self.pair_counts) if discount is None else discount
        before, after = np.divmod(self.pair_codes, self.stride)
        self.context_counts = np.bincount(before, weights=self.pair_counts, minlength=self.stride)
        self.followers = np.bincount(before, minlength=self.stride)  # N1+(v •)
        self.predecessors = np.bincount(after, minlength=self.stride)  # N1+(• w)
        self.distinct_pairs = len(self.pair_codes)  # N1+(• •)
        d, pairs = self.discount, self.distinct_pairs
        self.continuations = (np.maximum(self.predecessors - d, 0.0) / pairs
                              + d * np.count_nonzero(self.predecessors) / pairs / self.vocabulary)

    def _index(self, symbols: np.ndarray) -> np.ndarray:
        """Table index of each symbol; one outside the vocabulary maps past the table (a context never seen)."""
        index = np.asarray(symbols, dtype=np.int64) + 2
        return np.where((index >= 0) & (index < self.width), index, self.width)

    def _code(self, previous: np.ndarray, following: np.ndarray) -> np.ndarray:
        return self._index(previous) * self.stride + self._index(following)

    def _pair_count(self, codes: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self.pair_codes, codes), len(self.pair_codes) - 1)
        return np.where(self.pair_codes[at] == codes, self.pair_counts[at], 0)

    def probabilities(self, words: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """P(word | previous) for arrays of symbols, element by element."""
        before, after = self._index(previous), self._index(words)
        context, followers, continuation = self.context_counts[before], self.followers[before], \
            self.continuations[after]
        seen = context > 0
        safe = np.where(seen, context, 1.0)
        pair = self._pair_count(before * self.stride + after)
        backed = np.maximum(pair - self.discount, 0.0) / safe + self.discount * followers / safe * continuation
        return np.where(seen, backed, continuation)

    def continuation(self, word: int) -> float:
        return float(self.continuations[self._index(np.array([word]))[0]])

    def probability(self, word: int, previous: int) -> float:
        return float(self.probabilities(np.array([word]), np.array([previous]))[0])

    def log_likelihood(self, sequences: Iterable[Sequence[int]]) -> tuple[float, int]:
        """(sum of natural-log probabilities, number of predicted symbols, end symbols included)."""
        previous, following = boundary_pairs(sequences)
        return float(np.log(self.probabilities(following, previous)).sum()), len(following)

    def perplexity(self, sequences: Iterable[Sequence[int]]) -> float:
        total, count = self.log_likelihood(sequences)
        if count == 0:
            raise ValueError("no sequences to score")
        return math.exp(-total / count)


def class_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """How often each output class occurs: the pieces (ids), then the end symbol at index ``vocab_size``."""
    sequences = list(sequences)
    pieces = np.fromiter((piece for sequence in sequences for piece in sequence), dtype=np.int64)
    counts = np.bincount(pieces, minlength=vocab_size + 1)
    counts[vocab_size] += len(sequences)
    return counts


def unigram_perplexity(train: Iterable[Sequence[int]], heldout: Iterable[Sequence[int]], vocab_size: int) -> float:
    """Add-one unigram model (pieces and the end symbol): the floor any context should beat."""
    counts, scored = class_counts(train, vocab_size), class_counts(heldout, vocab_size)
    if scored.sum() == 0:
        raise ValueError("no sequences to score")
    log_probs = np.log((counts + 1) / (counts.sum() + vocab_size + 1))
    return math.exp(-float(scored @ log_probs) / scored.sum())


def context_distribution(model: KneserNeyBigram, previous: int, vocab_size: int) -> dict[int, float]:
    """P(· | previous) over every piece and the end symbol (for checks: it sums to one)."""
    return {word: model.probability(word, previous) for word in [*range(vocab_size), END]}



# ---------------------------------------------------------------- the LSTM language model (h_t = f(h_{t-1}, x_t))
#
# Output: torch's adaptive softmax (Grave et al. 2017), an exact, normalised distribution that spends
# full width only on the frequent classes: ~5x faster per step than a 16k-wide linear layer here. It
# wants classes in order of frequency, so targets go through ``class_rank`` (piece id → rank in the
# training counts); inputs keep their ids.


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


def frequency_rank(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """rank[c] of every output class (pieces, then the end symbol ``vocab_size``): 0 is the most frequent."""
    counts = torch.from_numpy(class_counts(sequences, vocab_size))
    order = torch.sort(counts, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank


def usable_cutoffs(cutoffs: Sequence[int], classes: int) -> list[int]:
    """The cutoffs inside the vocabulary; none left (a tiny vocabulary): one at a quarter of it."""
    return sorted(c for c in set(cutoffs) if 0 < c < classes - 1) or [max(1, classes // 4)]


class LstmLanguageModel(torch.nn.Module):
    """Embedding (pieces + the start symbol) → LSTM → adaptive softmax over the pieces and the end symbol."""

    def __init__(self, vocab_size: int, embedding: int, hidden: int, layers: int,
                 class_rank: torch.Tensor | None = None, cutoffs: Sequence[int] = (2000, 8000)):
        super().__init__()
        classes = vocab_size + 1
        self.embed = torch.nn.Embedding(classes, embedding)
        self.lstm = torch.nn.LSTM(embedding, hidden, layers, batch_first=True)
        self.out = torch.nn.AdaptiveLogSoftmaxWithLoss(hidden, classes, usable_cutoffs(cutoffs, classes),
                                                       div_value=4.0)
        self.register_buffer("class_rank", torch.arange(classes) if class_rank is None else class_rank.clone())

    def target_log_probs(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(target | the pieces before it) at every non-padding position, flattened."""
        hidden = self.lstm(self.embed(inputs))[0].reshape(-1, self.lstm.hidden_size)
        targets = targets.reshape(-1)
        keep = targets != -100
        return self.out(hidden[keep], self.class_rank[targets[keep]]).output

    def next_distribution(self, inputs: torch.Tensor) -> torch.Tensor:
        """P(· | inputs) over the classes in id order (pieces, then end), for the last position of each row."""
        hidden = self.lstm(self.embed(inputs))[0][:, -1]
        return self.out.log_prob(hidden)[:, self.class_rank].exp()


def lstm_model(vocab_size: int, embedding: int = 128, hidden: int = 256, layers: int = 1, seed: int = 0,
               class_rank: torch.Tensor | None = None, cutoffs: Sequence[int] = (2000, 8000)) -> LstmLanguageModel:
    torch.manual_seed(seed)
    return LstmLanguageModel(vocab_size, embedding, hidden, layers, class_rank, cutoffs)


def lstm_loss(model, sequences: Sequence[Sequence[int]], vocab_size: int, reduction: str = "mean"):
    """Negative log-likelihood of every piece and end symbol: mean (training) or sum (perplexity)."""
    log_probs = model.target_log_probs(*lstm_batch(sequences, vocab_size))
    return -(log_probs.mean() if reduction == "mean" else log_probs.sum())


def train_lstm(model, sequences: Sequence[Sequence[int]], vocab_size: int, steps: int | None = None,
               batch_size: int = 32, learning_rate: float = 2e-3, seed: int = 0,
               budget_seconds: float | None = None, progress=None) -> list[float]:
    """Adam over random batches of sentences for ``steps`` steps or ``budget_seconds``, whichever ends first.

    Returns the loss of every step taken. ``progress`` (a ``bertflow.progress.Progress``) hears of every step.
    """
    if steps is None and budget_seconds is None:
        raise ValueError("give steps or budget_seconds")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    started = time.monotonic()
    deadline = None if budget_seconds is None else started + budget_seconds
    losses: list[float] = []
    model.train()
    while (steps is None or len(losses) < steps) and (deadline is None or time.monotonic() < deadline):
        rows = torch.randint(len(sequences), (min(batch_size, len(sequences)),), generator=generator).tolist()
        loss = lstm_loss(model, [sequences[i] for i in rows], vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress.update(len(losses), time.monotonic() - started, loss=f"{losses[-1]:.4f}")
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
