"""Stage pretrain_data on the tiny profile: the stored shards' contract, statistics and determinism, and the
streaming: units are read only as fast as the workers build them."""

import hashlib
import json
import shutil
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from benchmarks.data_scaling import measure_stage
from bertflow.io import InputError
from tasks.cli import run_stage
from tasks.pretrain_data import plan_units, run_units
from tests.conftest import REPO, write_params
from tests.data.conftest import copy_upstream


def shard_hashes(root):
    folder = root / "data" / "pretrain"
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.arrow"))}


def load_split(root, split):
    files = sorted((root / "data" / "pretrain" / split).glob("*.arrow"))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])


@pytest.fixture(scope="module")
def train_rows(tiny_run):
    return load_split(tiny_run, "train").to_list()


@pytest.fixture(scope="module")
def specials(tiny_run):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_run / "artifacts" / "tokenizer"))
    return tokenizer, set(tokenizer.all_special_ids)


def test_instances_have_bert_layout_and_fit(train_rows, specials):
    tokenizer, _ = specials
    assert len(train_rows) > 10_000
    for row in train_rows:
        ids, segments = row["input_ids"], row["token_type_ids"]
        assert len(ids) <= 64 and len(ids) == len(segments)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        first_sep = ids.index(tokenizer.sep_token_id)
        assert 1 <= first_sep < len(ids) - 2
        assert segments == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


def test_nsp_positives_are_half(train_rows):
    positives = sum(row["next_sentence_label"] == 0 for row in train_rows) / len(train_rows)
    assert abs(positives - 0.5) <= 0.03


def test_static_masks_follow_the_recipe(train_rows, specials):
    tokenizer, special_ids = specials
    maskable = masked = as_mask = as_self = 0
    for row in train_rows:
        ids, positions, originals = row["input_ids"], row["masked_lm_positions"], row["masked_lm_ids"]
        assert 1 <= len(positions) <= 20 and positions == sorted(set(positions))
        assert not set(originals) & special_ids
        maskable += len(ids) - 3
        masked += len(positions)
        as_mask += sum(ids[p] == tokenizer.mask_token_id for p in positions)
        as_self += sum(ids[p] == o for p, o in zip(positions, originals, strict=True))
        assert sum(t == tokenizer.mask_token_id for t in ids) == sum(ids[p] == tokenizer.mask_token_id
                                                                      for p in positions)
    assert abs(masked / maskable - 0.15) <= 0.01
    assert abs(as_mask / masked - 0.8) <= 0.03
    assert abs(as_self / masked - 0.1) <= 0.03
    assert abs((masked - as_mask - as_self) / masked - 0.1) <= 0.03


def test_report_matches_the_shards(tiny_run, train_rows):
    figures = json.loads((tiny_run / "reports" / "pretrain_data.json").read_text())
    assert figures["train"]["instances"] == len(train_rows)
    assert figures["train"]["tokens"] == sum(len(r["input_ids"]) for r in train_rows)
    assert figures["train"]["masked_special_tokens"] == 0 and figures["train"]["longest_instance"] <= 64
    assert figures["heldout"]["instances"] == len(load_split(tiny_run, "heldout"))
    info = json.loads((tiny_run / "data" / "pretrain" / "info.json").read_text())
    assert info["params"]["random_seed"] == figures["random_seed"] == 12345


def rerun(tiny_run, tmp_path, **overrides):
    copy_upstream(tiny_run, tmp_path, "data/corpus", "artifacts/tokenizer")
    run_stage("pretrain_data", REPO / "params.tiny.yaml", tmp_path,
              {f"pretrain_data.{key}": value for key, value in overrides.items()})
    return tmp_path


def test_same_seed_gives_byte_identical_shards_whatever_num_proc(tiny_run, tmp_path):
    info = json.loads((tiny_run / "data" / "pretrain" / "info.json").read_text())
    assert info["params"]["num_proc"] == 2 and info["figures"]["units"]["train"] >= 4  # several units, two workers
    again = rerun(tiny_run, tmp_path, num_proc=1)
    assert shard_hashes(again) == shard_hashes(tiny_run)


def count_documents(unit) -> tuple[int, int]:
    time.sleep(0.002)  # a worker slower than the reader: an eager reader would run ahead
    return unit.chunk, len(unit.documents)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_documents_are_read_only_as_fast_as_the_workers_build(num_proc):
    """The documents read but not yet built stay within (num_proc + 1) units out plus the two being cut."""
    read = 0

    def documents():
        nonlocal read
        for d in range(3000):
            read += 1
            yield [f"document {d:05d}".ljust(40, ".")] * 2  # 80 bytes: ten documents make a unit of 200 tokens

    built, largest = 0, 0
    results = run_units(plan_units(documents(), "train", 1, shard_tokens=200, static=True), num_proc, count_documents)
    for chunk, (got, size) in enumerate(results):
        assert got == chunk
        built += size
        largest = max(largest, size)
        assert read - built <= (num_proc + 1 + 2) * largest, f"{read - built} documents read ahead of the workers"
    assert built == read == 3000 and largest == 10


def test_another_seed_gives_other_shards(tiny_run, tmp_path):
    other = rerun(tiny_run, tmp_path, random_seed=7)
    assert shard_hashes(other).keys() == shard_hashes(tiny_run).keys()
    assert shard_hashes(other) != shard_hashes(tiny_run)


def test_dynamic_masking_stores_unmasked_pairs(tiny_run, tmp_path):
    dynamic = rerun(tiny_run, tmp_path, masking="dynamic")
    rows = load_split(dynamic, "train").to_list()
    mask_id = AutoTokenizer.from_pretrained(str(tiny_run / "artifacts" / "tokenizer")).mask_token_id
    assert all(not r["masked_lm_positions"] and mask_id not in r["input_ids"] for r in rows)
    assert load_split(dynamic, "heldout")[0]["masked_lm_positions"], "held-out keeps fixed masks for evaluation"
    figures = json.loads((dynamic / "reports" / "pretrain_data.json").read_text())
    assert abs(figures["train"]["masked_rate"] - 0.15) <= 0.01


def test_missing_tokenizer_is_a_clear_error(tiny, tmp_path):
    params, folder = tiny
    path = write_params(folder, params)
    run_stage("ingest", path, folder)
    with pytest.raises(InputError, match="artifacts/tokenizer: no tokenizer here; run `bertflow tokenizer` first"):
        run_stage("pretrain_data", path, folder)
    assert not (folder / "data" / "pretrain").exists()


def corpus_copies(tiny_run, root, copies: int):
    """A project whose train split is ``copies`` distinct copies of a quarter of tiny_run's, in row groups of 16
    documents (the reader's memory follows the row groups, which the writer decides)."""
    copy_upstream(tiny_run, root, "artifacts/tokenizer")
    (root / "data" / "corpus").mkdir(parents=True)
    documents = pq.read_table(tiny_run / "data" / "corpus" / "train.parquet")["sentences"].to_pylist()
    documents = documents[:len(documents) // 4]
    train = [[f"copy {c}: {s}" for s in d] if c else d for c in range(copies) for d in documents]
    pq.write_table(pa.table({"sentences": train}), root / "data" / "corpus" / "train.parquet", row_group_size=16)
    shutil.copy(tiny_run / "data" / "corpus" / "heldout.parquet", root / "data" / "corpus" / "heldout.parquet")
    return root


def peak_memory_mb(root) -> tuple[float, float]:
    """(largest process's peak RSS, the process tree's peak summed RSS) of pretrain_data in a child process."""
    figures = measure_stage("pretrain_data", REPO / "params.tiny.yaml", root, [
        "pretrain_data.dupe_factor=1", "pretrain_data.shard_tokens=5000", "pretrain_data.num_proc=2"])
    return figures["peak_rss_mb"], figures["peak_tree_rss_mb"]


def test_peak_memory_does_not_grow_with_the_corpus(tiny_run, tmp_path):
    """4× the corpus, the same peak memory (the whole-split version: about +150 MB in its largest process)."""
    largest, tree = peak_memory_mb(corpus_copies(tiny_run, tmp_path / "x1", 1))
    largest4, tree4 = peak_memory_mb(corpus_copies(tiny_run, tmp_path / "x4", 4))
    assert largest4 - largest <= 20 and tree4 - tree <= 40, \
        f"peak RSS of the largest process {largest} → {largest4} MB, of all {tree} → {tree4} MB at 4x the corpus"


def test_a_split_of_one_document_is_a_clear_error(tiny):
    params, folder = tiny  # the hand-written corpus holds out one document
    path = write_params(folder, params)
    for stage in ("ingest", "tokenizer"):
        run_stage(stage, path, folder)
    with pytest.raises(InputError, match=r"heldout.parquet: 1 non-empty documents in the heldout split \(unit 0\); "
                                         "next-sentence pairs need at least 2"):
        run_stage("pretrain_data", path, folder)
    assert not (folder / "data" / "pretrain").exists()
    params["pretrain_data"]["next_sentence"] = False  # single segments need no second document
    params["pretrain"]["objective"] = "mlm"
    run_stage("pretrain_data", write_params(folder, params), folder)
    assert load_split(folder, "heldout").num_rows > 0
