"""Stage pretrain_data: NSP sentence pairs and MLM masks, with create_pretraining_data.py's semantics.

Reads: ``data/corpus/{train,heldout}.parquet`` and ``artifacts/tokenizer``.
Writes: ``data/pretrain/{train,heldout}/shard-*.arrow`` (Arrow IPC streams, loadable with
``datasets.Dataset.from_file``), ``data/pretrain/info.json`` and ``reports/pretrain_data.json``.
Run: ``bertflow pretrain_data``.

Each instance is ``[CLS] A [SEP] B [SEP]`` with segment ids; B is A's true continuation half of
the time, otherwise text from a different document (``next_sentence_label`` 0 = continuation,
1 = random, as in transformers). ``mask_tokens`` is the one masking function: this stage uses it
for static masks (train with ``masking: static``, held-out always) and the training collator for
dynamic ones. Work is cut into units of about ``shard_tokens`` source tokens per dupe, each with
its own seed derived from ``random_seed``, so the output does not depend on ``num_proc``.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tasks.io import InputError, atomic_dirs, read_column, write_json
from tasks.params import PretrainDataParams
from tasks.paths import Paths
from tasks.tokenizer import load_tokenizer

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("token_type_ids", pa.list_(pa.int8())),
    ("next_sentence_label", pa.int8()),
    ("masked_lm_positions", pa.list_(pa.int16())),
    ("masked_lm_ids", pa.list_(pa.int32())),
])
ENCODE_BATCH = 10_000
Document = list[list[int]]  # sentences of token ids


# ---------------------------------------------------------------- masking (shared with training)


@dataclass(frozen=True)
class MaskingSpec:
    mask_token_id: int
    special_ids: frozenset[int]
    random_ids: tuple[int, ...]  # replacement candidates for the 10 % "random token" case
    masked_lm_prob: float
    max_predictions_per_seq: int
    is_continuation: tuple[bool, ...] | None = None  # per vocabulary id; set for whole-word masking


def masking_spec(tokenizer, params: PretrainDataParams) -> MaskingSpec:
    special = frozenset(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    continuation = None
    if params.do_whole_word_mask:
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        continuation = tuple(token.startswith("##") for token, _ in by_id)
    return MaskingSpec(
        mask_token_id=tokenizer.mask_token_id, special_ids=special,
        random_ids=tuple(i for i in sorted(vocab.values()) if i not in special),
        masked_lm_prob=params.masked_lm_prob, max_predictions_per_seq=params.max_predictions_per_seq,
        is_continuation=continuation)


def candidate_groups(input_ids: Sequence[int], spec: MaskingSpec) -> list[list[int]]:
    """Positions that may be masked, grouped by word when whole-word masking is on."""
    groups: list[list[int]] = []
    for i, token in enumerate(input_ids):
        if token in spec.special_ids:
            continue
        joins_word = (spec.is_continuation is not None and groups and groups[-1][-1] == i - 1
                      and spec.is_continuation[token])
        if joins_word:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def mask_tokens(input_ids: Sequence[int], spec: MaskingSpec,
                rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """BERT masking: returns (masked input ids, masked positions, original ids at those positions).

    ``masked_lm_prob`` of the non-special tokens (at least one, at most ``max_predictions_per_seq``)
    are chosen; of those 80 % become [MASK], 10 % a random non-special token, 10 % stay unchanged.
    """
    groups = candidate_groups(input_ids, spec)
    num_candidates = sum(len(group) for group in groups)
    num_to_predict = min(spec.max_predictions_per_seq, max(1, round(num_candidates * spec.masked_lm_prob)))
    rng.shuffle(groups)
    covered: list[int] = []
    for group in groups:
        if len(covered) >= num_to_predict:
            break
        if len(covered) + len(group) <= num_to_predict:
            covered.extend(group)
    output = list(input_ids)
    for index in covered:
        draw = rng.random()
        if draw < 0.8:
            output[index] = spec.mask_token_id
        elif draw >= 0.9:
            output[index] = rng.choice(spec.random_ids)
    positions = sorted(covered)
    return output, positions, [input_ids[p] for p in positions]


# ---------------------------------------------------------------- NSP pairs


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


# ---------------------------------------------------------------- work units


@dataclass(frozen=True)
class Unit:
    split: str
    dupe: int
    chunk: int
    start: int  # document range [start, stop)
    stop: int
    static: bool

    @property
    def name(self) -> str:
        return f"shard-{self.dupe:03d}-{self.chunk:05d}.arrow"


def plan_units(documents: Sequence[Document], split: str, dupe_factor: int, shard_tokens: int,
               static: bool) -> list[Unit]:
    """Cut the documents into ranges of about ``shard_tokens`` tokens, once per dupe."""
    ranges, start, tokens = [], 0, 0
    for i, document in enumerate(documents):
        tokens += sum(len(s) for s in document)
        if tokens >= shard_tokens:
            ranges.append((start, i + 1))
            start, tokens = i + 1, 0
    if start < len(documents):
        ranges.append((start, len(documents)))
    return [Unit(split, dupe, chunk, a, b, static)
            for dupe in range(dupe_factor) for chunk, (a, b) in enumerate(ranges)]


def build_unit(unit: Unit, documents: Sequence[Document], pairs: PairSpec, masking: MaskingSpec,
               seed: int) -> tuple[pa.Table, Counter]:
    """All instances of one unit, shuffled, masked; returns the table and its counts."""
    rng = random.Random(f"{seed}/{unit.split}/{unit.dupe}/{unit.chunk}")
    instances = [inst for index in range(unit.start, unit.stop)
                 for inst in create_instances_from_document(documents, index, pairs, rng)]
    rng.shuffle(instances)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    counts: Counter = Counter()
    for inst in instances:
        masked, positions, labels = mask_tokens(inst.input_ids, masking, rng)
        _count(counts, inst, masked, positions, labels, masking)
        columns["input_ids"].append(masked if unit.static else inst.input_ids)
        columns["token_type_ids"].append(inst.token_type_ids)
        columns["next_sentence_label"].append(int(inst.is_random_next))
        columns["masked_lm_positions"].append(positions if unit.static else [])
        columns["masked_lm_ids"].append(labels if unit.static else [])
    return pa.table(columns, schema=SCHEMA), counts


def _count(counts: Counter, inst: Instance, masked: list[int], positions: list[int], labels: list[int],
           masking: MaskingSpec) -> None:
    counts["instances"] += 1
    counts["tokens"] += len(inst.input_ids)
    counts["random_next"] += inst.is_random_next
    counts["maskable"] += sum(1 for t in inst.input_ids if t not in masking.special_ids)
    counts["masked"] += len(positions)
    counts["masked_special"] += sum(1 for t in labels if t in masking.special_ids)
    for position, original in zip(positions, labels, strict=True):
        kind = "as_mask" if masked[position] == masking.mask_token_id else (
            "as_self" if masked[position] == original else "as_random")
        counts[kind] += 1
    counts["longest"] = max(counts["longest"], len(inst.input_ids))


def write_table(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


# Set in the parent before the pool forks, so workers share the token lists without pickling.
_WORK: dict = {}


def _run_unit(unit: Unit) -> tuple[str, Counter]:
    documents = _WORK["documents"][unit.split]
    table, counts = build_unit(unit, documents, _WORK["pairs"], _WORK["masking"], _WORK["seed"])
    write_table(_WORK["out"] / unit.split / unit.name, table)
    return f"{unit.split}/{unit.name}", counts


def run_units(units: list[Unit], num_proc: int) -> list[tuple[str, Counter]]:
    if num_proc == 1 or len(units) == 1:
        return [_run_unit(unit) for unit in units]
    with multiprocessing.get_context("fork").Pool(min(num_proc, len(units))) as pool:
        return pool.map(_run_unit, units, chunksize=1)


# ---------------------------------------------------------------- tokenizing and figures


def tokenize_documents(tokenizer, documents: list[list[str]]) -> list[Document]:
    """Token ids of every sentence (no special tokens); empty sentences and documents dropped."""
    flat = [s for doc in documents for s in doc]
    ids: list[list[int]] = []
    for start in range(0, len(flat), ENCODE_BATCH):
        batch = tokenizer.backend_tokenizer.encode_batch(flat[start:start + ENCODE_BATCH], add_special_tokens=False)
        ids.extend(encoding.ids for encoding in batch)
    out, cursor = [], 0
    for doc in documents:
        sentences = [s for s in ids[cursor:cursor + len(doc)] if s]
        cursor += len(doc)
        if sentences:
            out.append(sentences)
    return out


def merge_counts(parts: list[Counter]) -> Counter:
    """Sum per-shard counts; ``longest`` is a maximum, not a sum."""
    total = sum(parts, Counter())
    total["longest"] = max((part["longest"] for part in parts), default=0)
    return total


def summarize(counts: Counter, max_seq_length: int) -> dict:
    masked = max(counts["masked"], 1)
    return {
        "instances": counts["instances"],
        "tokens": counts["tokens"],
        "nsp_positive_rate": round(1 - counts["random_next"] / max(counts["instances"], 1), 4),
        "masked_rate": round(counts["masked"] / max(counts["maskable"], 1), 4),
        "masked_split": {kind: round(counts[f"as_{kind}"] / masked, 4) for kind in ("mask", "random", "self")},
        "masked_special_tokens": counts["masked_special"],
        "longest_instance": counts["longest"],
        "padding_fraction": round(1 - counts["tokens"] / max(counts["instances"] * max_seq_length, 1), 4),
    }


def group_rows(texts: list[str], rows_per_document: int, repeat: int, seed: int) -> list[list[str]]:
    """Pseudo-documents of labeled texts for in-domain MLM (their NSP pairs are noise).

    The first copy keeps the file order; each further copy is shuffled (seeded) before grouping,
    so repeated texts meet different neighbours.
    """
    documents = []
    for copy in range(repeat):
        rows = list(texts)
        if copy:
            random.Random(f"{seed}/labeled/{copy}").shuffle(rows)
        documents += [rows[i:i + rows_per_document] for i in range(0, len(rows), rows_per_document)]
    return documents


def read_texts(paths: Paths, params: PretrainDataParams) -> dict[str, list[list[str]]]:
    """Sentences per document: the corpus splits, plus the labeled training texts when asked (train only)."""
    texts = {split: read_column(paths.corpus / f"{split}.parquet", "sentences") for split in ("train", "heldout")}
    if params.include_labeled_train:
        labeled = read_column(paths.labeled / "train.parquet", "text")
        texts["train"] = texts["train"] + group_rows(labeled, params.labeled_rows_per_document,
                                                     params.labeled_repeat, params.random_seed)
    return texts


# ---------------------------------------------------------------- edge


def run(params: PretrainDataParams, paths: Paths) -> dict:
    started = time.perf_counter()
    tokenizer = load_tokenizer(paths.tokenizer)
    texts = read_texts(paths, params)
    source_bytes = sum(len(s.encode("utf-8")) for docs in texts.values() for doc in docs for s in doc)
    documents = {split: tokenize_documents(tokenizer, docs) for split, docs in texts.items()}
    for split, docs in documents.items():
        if len(docs) < 2:
            raise InputError(f"{paths.corpus / split}.parquet: {len(docs)} non-empty documents; "
                             "next-sentence pairs need at least 2")
    tokenize_seconds = time.perf_counter() - started
    units = (plan_units(documents["train"], "train", params.dupe_factor, params.shard_tokens,
                        params.masking == "static")
             + plan_units(documents["heldout"], "heldout", 1, params.shard_tokens, static=True))
    with atomic_dirs([paths.pretrain_data]) as (out,):
        for split in documents:
            (out / split).mkdir()
        _WORK.update(documents=documents, out=out, seed=params.random_seed, masking=masking_spec(tokenizer, params),
                     pairs=PairSpec(tokenizer.cls_token_id, tokenizer.sep_token_id, params.max_seq_length,
                                    params.short_seq_prob))
        try:
            results = run_units(units, params.num_proc)
        finally:
            _WORK.clear()
        figures = _figures(results, params, source_bytes, tokenize_seconds, started)
        write_json(out / "info.json", {"params": params.model_dump(), "vocab_size": len(tokenizer),
                                       "schema": SCHEMA.names, "shards": {name: c["instances"] for name, c in results},
                                       "figures": figures})
    return figures


def _figures(results, params: PretrainDataParams, source_bytes: int, tokenize_seconds: float,
             started: float) -> dict:
    by_split = {split: merge_counts([c for name, c in results if name.startswith(split + "/")])
                for split in ("train", "heldout")}
    seconds = time.perf_counter() - started
    return {
        "masking": params.masking,
        "random_seed": params.random_seed,
        "train": summarize(by_split["train"], params.max_seq_length),
        "heldout": summarize(by_split["heldout"], params.max_seq_length),
        "shards": len(results),
        "source_mb": round(source_bytes / 1e6, 2),
        "tokenize_seconds": round(tokenize_seconds, 2),
        "seconds": round(seconds, 2),
        "mb_per_second": round(source_bytes / 1e6 / seconds, 3),
    }
