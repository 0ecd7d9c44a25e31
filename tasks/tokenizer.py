"""Stage tokenizer: train a BERT WordPiece vocabulary on the corpus's train split, or adopt the vocabulary
of the checkpoint that pretraining continues from (``pretrain.init``).

Reads: ``data/corpus/train.parquet`` (and ``data/labeled/train.parquet`` when
``tokenizer.include_labeled_train``); the held-out split and the labeled training texts for the
figures; the ``pretrain.init`` checkpoint's tokenizer when there is one. Never test text.
Writes: ``artifacts/tokenizer/`` (``save_pretrained`` layout: ``AutoTokenizer.from_pretrained``
returns a fast BERT tokenizer with the same ids) and ``reports/tokenizer.json``: how well the saved
vocabulary fits ([UNK] rate, word pieces per word) and, when adopted, what the vocabulary trained
here would give beside it. Run: ``bertflow tokenizer``. Later stages call ``load_tokenizer``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bertflow import checkpoints as ck
from bertflow.io import atomic_dirs, read_column
from bertflow.params import Params, TokenizerParams
from bertflow.paths import Paths
from bertflow.tokenization import read_sentences

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FIGURE_BATCH = 1000


def construct_tokenizer(params: TokenizerParams) -> Tokenizer:
    """An untrained WordPiece tokenizer with BERT's normaliser (CJK characters split one per token)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=params.strip_accents,
        lowercase=params.lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def train_vocab(texts: Iterable[str], params: TokenizerParams) -> dict[str, int]:
    """WordPiece vocabulary (token → id) learned from ``texts``; special tokens take ids 0-4."""
    tokenizer = construct_tokenizer(params)
    trainer = trainers.WordPieceTrainer(
        vocab_size=params.vocab_size, min_frequency=params.min_frequency,
        limit_alphabet=params.limit_alphabet, special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.get_vocab()


def to_transformers(vocab: dict[str, int], params: TokenizerParams, max_length: int):
    """The transformers BERT tokenizer (fast, tokenizers backend) over ``vocab``."""
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=vocab, do_lower_case=params.lowercase, strip_accents=params.strip_accents,
        tokenize_chinese_chars=True, model_max_length=max_length)


def fit_figures(tokenizer, texts: list[str], name: str) -> dict:
    """Word pieces, [UNK] rate and mean word pieces per (pre-tokenized) word on ``texts``, keyed ``<name>_*``."""
    backend = tokenizer.backend_tokenizer
    unk_id = tokenizer.unk_token_id
    pieces = unknown = words = 0
    for start in range(0, len(texts), FIGURE_BATCH):
        for encoding in backend.encode_batch(texts[start:start + FIGURE_BATCH], add_special_tokens=False):
            pieces += len(encoding.ids)
            unknown += encoding.ids.count(unk_id)
            words += len({w for w in encoding.word_ids if w is not None})
    return {f"{name}_tokens": pieces, f"{name}_unk_rate": round(unknown / max(pieces, 1), 6),
            f"{name}_pieces_per_word": round(pieces / max(words, 1), 4)}


def tokenizer_figures(tokenizer, heldout: list[str], labeled: list[str]) -> dict:
    """Vocabulary size and the fit on the held-out corpus and on the labeled training texts."""
    return {"vocab_size": len(tokenizer), **fit_figures(tokenizer, heldout, "heldout"),
            **fit_figures(tokenizer, labeled, "labeled")}


def write_vocab_txt(path: Path, vocab: dict[str, int]) -> None:
    """Google BERT's vocab.txt (one token per line, in id order), for tools that expect it."""
    path.write_text("".join(f"{token}\n" for token, _ in sorted(vocab.items(), key=lambda item: item[1])),
                    encoding="utf-8")


def training_texts(paths: Paths, params: TokenizerParams) -> Iterator[str]:
    """Train-split text only: corpus sentences, then (optionally) labeled training texts."""
    yield from read_sentences(paths.corpus / "train.parquet")
    if params.include_labeled_train:
        yield from read_column(paths.labeled / "train.parquet", "text")


def adopted_tokenizer(checkpoint: ck.Checkpoint, max_length: int):
    """The checkpoint's tokenizer as it is (its lower-casing and accent rules), with ``max_length``."""
    tokenizer = ck.load_checkpoint_tokenizer(checkpoint)
    tokenizer.model_max_length = max_length
    return tokenizer


def max_length(params: Params, checkpoint: ck.Checkpoint | None) -> int:
    """``tokenizer.model_max_length``, or the positions of the model it will serve (the checkpoint's, or
    ``pretrain.model``'s from scratch)."""
    if params.tokenizer.model_max_length:
        return params.tokenizer.model_max_length
    if checkpoint is None:
        return params.pretrain.model.max_position_embeddings
    return ck.read_config(checkpoint).max_position_embeddings


def run(params: Params, paths: Paths) -> dict:
    """Trains a vocabulary in any case: it is saved, or (when the checkpoint's is adopted) the yardstick."""
    own, started = params.tokenizer, time.perf_counter()
    adopting = not ck.is_scratch(params.pretrain.init)
    checkpoint = ck.resolve(params.pretrain.init) if adopting else None
    length = max_length(params, checkpoint)
    trained = to_transformers(train_vocab(training_texts(paths, own), own), own, length)
    train_seconds = time.perf_counter() - started
    tokenizer = adopted_tokenizer(checkpoint, length) if adopting else trained
    with atomic_dirs([paths.tokenizer]) as (folder,):
        tokenizer.save_pretrained(str(folder))
        write_vocab_txt(folder / "vocab.txt", tokenizer.get_vocab())
    texts = (read_sentences(paths.corpus / "heldout.parquet"),
             list(read_column(paths.labeled / "train.parquet", "text")))
    figures = {"source": "checkpoint" if adopting else "trained", **tokenizer_figures(tokenizer, *texts)}
    if adopting:
        figures.update(init=params.pretrain.init, trained_here=tokenizer_figures(trained, *texts))
    return {**figures, "train_seconds": round(train_seconds, 2), "seconds": round(time.perf_counter() - started, 2)}
