"""Stage lm_baselines: left-to-right language models over the same word pieces BERT sees.

Reads: ``data/corpus/{train,heldout}.parquet`` (sentences) and ``artifacts/tokenizer``.
Writes: ``reports/lm_baselines/lstm.csv`` (the LSTM's training loss by step, a DVC plot; not when
``lstm.enabled`` is false) and
``reports/lm_baselines.json``: held-out perplexity of an add-one unigram model, an interpolated
Kneser-Ney bigram model and an LSTM LM trained within ``lstm.budget_minutes`` (or ``max_steps``),
each over every piece and sentence end of the held-out split, as the tokenizer splits it.
The report stage sets these beside BERT's held-out masked-LM figures. Run: ``bertflow lm_baselines``.
"""

from __future__ import annotations

import csv
import logging
import random
import time

import torch

from bertflow import language_models as lm
from bertflow import training as tr
from bertflow.io import InputError, atomic_dirs
from bertflow.params import LmBaselinesParams
from bertflow.paths import Paths
from bertflow.progress import Progress
from bertflow.tokenization import load_tokenizer, read_sentences, tokenize_documents

log = logging.getLogger(__name__)


def piece_ids(tokenizer, sentences: list[str]) -> list[list[int]]:
    """Each sentence's word-piece ids as pretraining sees them (no special tokens); empty ones dropped."""
    return [ids for document in tokenize_documents(tokenizer, [sentences]) for ids in document]


def sample(sentences: list[str], limit: int | None, seed: int) -> list[str]:
    """At most ``limit`` sentences, drawn at random (seeded) and kept in corpus order."""
    if limit is None or len(sentences) <= limit:
        return sentences
    keep = sorted(random.Random(seed).sample(range(len(sentences)), limit))
    return [sentences[i] for i in keep]


def read_pieces(paths: Paths, split: str, tokenizer, limit: int | None, seed: int) -> list[list[int]]:
    ids = piece_ids(tokenizer, sample(read_sentences(paths.corpus / f"{split}.parquet"), limit, seed))
    if not ids:
        raise InputError(f"{paths.corpus / f'{split}.parquet'}: no sentences with word pieces; "
                         "the language-model baselines need text in both corpus splits")
    return ids


def bigram_figures(train: list[list[int]], heldout: list[list[int]], vocab_size: int, discount: float | None) -> dict:
    started = time.perf_counter()
    model = lm.KneserNeyBigram(train, vocab_size, discount)
    return {"smoothing": "interpolated Kneser-Ney", "discount": round(model.discount, 4),
            "distinct_bigrams": model.distinct_pairs,
            "train_perplexity": round(model.perplexity(train), 3),
            "heldout_perplexity": round(model.perplexity(heldout), 3),
            "seconds": round(time.perf_counter() - started, 1)}


def lstm_figures(train: list[list[int]], heldout: list[list[int]], vocab_size: int, params) -> tuple[dict, list]:
    """Train the LSTM LM within its budget; (figures, per-step losses)."""
    started = time.perf_counter()
    model = lm.lstm_model(vocab_size, params.embedding_size, params.hidden_size, params.num_layers, params.seed,
                          lm.frequency_rank(train, vocab_size), params.cutoffs)
    budget = None if params.budget_minutes is None else params.budget_minutes * 60
    with Progress("lm_baselines lstm", params.max_steps, params.budget_minutes) as progress:
        losses = lm.train_lstm(model, train, vocab_size, params.max_steps, params.batch_size, params.learning_rate,
                               params.seed, budget, progress)
    trained = time.perf_counter() - started
    seen = len(losses) * min(params.batch_size, len(train))  # train_lstm draws min(batch, rows) per step
    figures = {"steps": len(losses), "sentences_seen": seen, "epochs": round(seen / len(train), 3),
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(trained, 1),
               "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
               "heldout_perplexity": round(lm.lstm_perplexity(model, heldout, vocab_size), 3),
               "seconds": round(time.perf_counter() - started, 1)}
    return figures, losses


def write_curve(path, losses: list[float], every: int) -> None:
    """(step, loss): the mean loss of each ``every`` steps, at the window's last step."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        for end in range(every, len(losses) + every, every):
            window = losses[end - every:end]
            if window:
                writer.writerow([min(end, len(losses)), round(sum(window) / len(window), 5)])


def run(params: LmBaselinesParams, paths: Paths) -> dict:
    started = time.perf_counter()
    tr.set_threads(params.num_threads)
    torch.manual_seed(params.lstm.seed)
    tokenizer = load_tokenizer(paths.tokenizer)
    vocab_size = len(tokenizer)
    train = read_pieces(paths, "train", tokenizer, params.max_train_sentences, params.lstm.seed)
    heldout = read_pieces(paths, "heldout", tokenizer, None, params.lstm.seed)
    log.info("lm_baselines: %d train and %d held-out sentences in word pieces; scoring unigram and bigram",
             len(train), len(heldout))
    figures = {
        "tokens": {"vocab_size": vocab_size, "train_sentences": len(train), "train_pieces": sum(map(len, train)),
                   "heldout_sentences": len(heldout), "heldout_pieces": sum(map(len, heldout)),
                   "predicted_per_sentence": "every piece and the sentence end"},
        "unigram": {"smoothing": "add-one",
                    "heldout_perplexity": round(lm.unigram_perplexity(train, heldout, vocab_size), 3)},
        "bigram": bigram_figures(train, heldout, vocab_size, params.bigram.discount),
    }
    log.info("lm_baselines: bigram held-out perplexity %.2f (%.1f s)%s", figures["bigram"]["heldout_perplexity"],
             figures["bigram"]["seconds"], "; training the LSTM" if params.lstm.enabled else "")
    figures["lstm"], losses = (lstm_figures(train, heldout, vocab_size, params.lstm) if params.lstm.enabled
                               else ({"enabled": False}, None))
    with atomic_dirs([paths.reports / "lm_baselines"]) as (folder,):
        # Without the LSTM the curve is a header only, so the "LSTM language model" plot of dvc.yaml still
        # finds its file (an empty folder would get atomic_dirs' EMPTY.md note, which `dvc exp save` needs).
        write_curve(folder / "lstm.csv", losses or [], params.lstm.log_every)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures
