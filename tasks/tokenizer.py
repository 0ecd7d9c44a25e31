"""Stage tokenizer: train a BERT WordPiece vocabulary on the corpus's train split.

Reads: ``data/corpus/train.parquet`` (and ``data/labeled/train.parquet`` when
``tokenizer.include_labeled_train``); the held-out split only for the figures. Never test text.
Writes: ``artifacts/tokenizer/`` (``save_pretrained`` layout: ``AutoTokenizer.from_pretrained``
returns a fast BERT tokenizer with the same ids) and ``reports/tokenizer.json``.
Run: ``bertflow tokenizer``. Later stages call ``load_tokenizer``; only this stage trains.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bertflow.io import atomic_dirs, read_column
from bertflow.params import TokenizerParams
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


def to_transformers(vocab: dict[str, int], params: TokenizerParams):
    """The transformers BERT tokenizer (fast, tokenizers backend) over ``vocab``."""
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=vocab, do_lower_case=params.lowercase, strip_accents=params.strip_accents,
        tokenize_chinese_chars=True, model_max_length=params.model_max_length)


def tokenizer_figures(tokenizer, texts: list[str]) -> dict:
    """Vocabulary size, [UNK] rate and mean word-pieces per (pre-tokenized) word on ``texts``."""
    backend = tokenizer.backend_tokenizer
    unk_id = tokenizer.unk_token_id
    pieces = unknown = words = 0
    for start in range(0, len(texts), FIGURE_BATCH):
        for encoding in backend.encode_batch(texts[start:start + FIGURE_BATCH], add_special_tokens=False):
            pieces += len(encoding.ids)
            unknown += encoding.ids.count(unk_id)
            words += len({w for w in encoding.word_ids if w is not None})
    return {
        "vocab_size": len(tokenizer),
        "heldout_tokens": pieces,
        "heldout_unk_rate": round(unknown / max(pieces, 1), 6),
        "heldout_pieces_per_word": round(pieces / max(words, 1), 4),
    }


def write_vocab_txt(path: Path, vocab: dict[str, int]) -> None:
    """Google BERT's vocab.txt (one token per line, in id order), for tools that expect it."""
    path.write_text("".join(f"{token}\n" for token, _ in sorted(vocab.items(), key=lambda item: item[1])),
                    encoding="utf-8")


def training_texts(paths: Paths, params: TokenizerParams) -> Iterator[str]:
    """Train-split text only: corpus sentences, then (optionally) labeled training texts."""
    yield from read_sentences(paths.corpus / "train.parquet")
    if params.include_labeled_train:
        yield from read_column(paths.labeled / "train.parquet", "text")


def run(params: TokenizerParams, paths: Paths) -> dict:
    started = time.perf_counter()
    vocab = train_vocab(training_texts(paths, params), params)
    tokenizer = to_transformers(vocab, params)
    train_seconds = time.perf_counter() - started
    with atomic_dirs([paths.tokenizer]) as (folder,):
        tokenizer.save_pretrained(str(folder))
        write_vocab_txt(folder / "vocab.txt", vocab)
    figures = tokenizer_figures(tokenizer, read_sentences(paths.corpus / "heldout.parquet"))
    return {**figures, "train_seconds": round(train_seconds, 2),
            "seconds": round(time.perf_counter() - started, 2)}
