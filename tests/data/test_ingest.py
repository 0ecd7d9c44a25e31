"""Stage ingest: known answers on a hand-written corpus, every input format, and every bad input."""

import gzip
import hashlib
import json
import lzma
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import zstandard

from bertflow.io import InputError
from bertflow.paths import Paths
from bertflow.timings import read_stage_report
from tasks.cli import run_stage
from tests.conftest import REPO, outputs_left, write_params


def ingest(params, folder):
    return run_stage("ingest", write_params(folder, params), folder)


def documents(folder, split):
    return pq.read_table(folder / "data" / "corpus" / f"{split}.parquet").to_pylist()


def test_tiny_corpus_known_answer(tiny):
    params, folder = tiny
    figures = ingest(params, folder)
    train, heldout = documents(folder, "train"), documents(folder, "heldout")
    assert [doc["sentences"][:3] for doc in train] == [
        ["The cat sat on the mat.", "It was a sunny day.", "Mr. Brown watched the cat from his window."],
        ["Rivers flow to the sea.", "The sea is salty.", "Fish swim in the rivers and in the sea."]]
    assert train[0]["sentences"][3:] == ["He made some tea.", "The tea was hot!", "Was the cat hungry?", "Nobody knew."]
    assert [doc["sentences"][0] for doc in heldout] == ["Mountains are tall and cold."]
    assert figures["corpus"]["documents_read"] == 5
    assert figures["corpus"]["dropped"] == {"duplicate": 1, "too_short": 1}
    assert figures["corpus"]["train"] == {"documents": 2, "sentences": 12, "characters": sum(
        len(s) for doc in train for s in doc["sentences"]), "whitespace_tokens": 33 + 25}
    # the results are the DVC metric, the seconds go to reports/timing/ (bertflow/timings.py); together, the figures
    assert "seconds" not in json.loads((folder / "reports" / "ingest.json").read_text())
    assert read_stage_report(Paths(folder), "ingest") == figures
    manifest = json.loads((folder / "data" / "corpus" / "manifest.json").read_text())
    digest = hashlib.sha256(b"a.txt\0" + hashlib.sha256((folder / "corpus" / "a.txt").read_bytes()).digest())
    assert manifest["sources"][0]["fingerprint"] == "sha256:" + digest.hexdigest()
    labeled = json.loads((folder / "data" / "labeled" / "manifest.json").read_text())
    assert labeled["fingerprints"]["test"] == "sha256:" + hashlib.sha256((folder / "test.tsv").read_bytes()).hexdigest()


def test_heldout_membership_is_stable_when_documents_are_added(tiny):
    params, folder = tiny
    params["ingest"]["corpus"]["heldout_fraction"] = 0.5
    ingest(params, folder)
    before = {doc["id"]: split for split in ("train", "heldout") for doc in documents(folder, split)}
    extra = "\n\n".join(f"Document number {i} talks about topic {i}. It has two sentences." for i in range(40))
    (folder / "corpus" / "b.txt").write_text(extra, encoding="utf-8")
    ingest(params, folder)
    after = {doc["id"]: split for split in ("train", "heldout") for doc in documents(folder, split)}
    assert len(after) == len(before) + 40
    assert {doc_id: after[doc_id] for doc_id in before} == before
    assert 0.3 < sum(split == "heldout" for split in after.values()) / len(after) < 0.7


def test_every_source_format(tiny):
    params, folder = tiny
    nested = folder / "mixed" / "deeper"
    nested.mkdir(parents=True)
    doc = "Alpha beta gamma delta. Epsilon zeta eta theta.\n\nIota kappa lambda mu. Nu xi omicron pi."
    (folder / "mixed" / "notes.md").write_text(doc.replace("Alpha", "Markdown"), encoding="utf-8")
    (folder / "mixed" / "x.txt.gz").write_bytes(gzip.compress(doc.replace("Alpha", "Gzip").encode()))
    (nested / "y.txt.xz").write_bytes(lzma.compress(doc.replace("Alpha", "Xz").encode()))
    (nested / "z.md.zst").write_bytes(zstandard.ZstdCompressor().compress(doc.replace("Alpha", "Zstd").encode()))
    (nested / "records.jsonl").write_text(
        "\n".join(json.dumps({"body": f"Record {i} has some words in it. And a second sentence."}) for i in range(3)),
        encoding="utf-8")
    (nested / "ignored.bin").write_bytes(b"\x00\x01")
    (folder / "whole.txt").write_text("First paragraph of one file.\n\nSecond paragraph, same document.",
                                      encoding="utf-8")
    params["ingest"]["corpus"]["sources"] = [
        {"path": "mixed", "text_field": "body"}, {"path": "whole.txt", "document_boundary": "file"}]
    params["ingest"]["corpus"]["heldout_fraction"] = 0.5
    figures = ingest(params, folder)
    firsts = {d["sentences"][0] for split in ("train", "heldout") for d in documents(folder, split)}
    for name in ("Markdown", "Gzip", "Xz", "Zstd"):
        assert f"{name} beta gamma delta." in firsts
    assert {f"Record {i} has some words in it." for i in range(3)} <= firsts
    assert "First paragraph of one file." in firsts
    whole = [d for split in ("train", "heldout") for d in documents(folder, split) if d["source"] == "whole.txt"]
    assert whole[0]["sentences"] == ["First paragraph of one file.", "Second paragraph, same document."]
    assert figures["corpus"]["documents_read"] == 4 * 2 + 3 + 1


# ------------------------------------------------------------------ labeled data


def labeled_rows(folder, split):
    return pq.read_table(folder / "data" / "labeled" / f"{split}.parquet").to_pylist()


def test_labeled_csv_with_string_labels_and_carved_splits(tiny):
    params, folder = tiny
    rows = [f'"review {i}, with a comma",{["neg", "pos", "neutral"][i % 3]}' for i in range(300)]
    (folder / "all.csv").write_text("text,sentiment\n" + "\n".join(rows) + "\n", encoding="utf-8")
    params["ingest"]["labeled"] = {"train": "all.csv", "text_column": "text", "label_column": "sentiment"}
    ingest(params, folder)
    splits = {split: labeled_rows(folder, split) for split in ("train", "dev", "test")}
    texts = {split: {row["text"] for row in rows} for split, rows in splits.items()}
    assert sum(map(len, texts.values())) == 300
    assert not (texts["train"] & texts["dev"] or texts["train"] & texts["test"] or texts["dev"] & texts["test"])
    assert 15 <= len(texts["dev"]) <= 45 and 15 <= len(texts["test"]) <= 45
    labels = json.loads((folder / "data" / "labeled" / "labels.json").read_text())
    assert labels["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}
    assert all(labels["label2id"][row["label"]] == row["label_id"] for row in splits["train"])
    ingest(params, folder)  # carving is deterministic
    assert {row["text"] for row in labeled_rows(folder, "dev")} == texts["dev"]


def test_labeled_jsonl_and_headerless_tsv(tiny):
    params, folder = tiny
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"t": f"text {i}", "y": i % 2}) for i in range(20)))
    (folder / "dev.tsv").write_text("1\tgood one\n0\tbad one\n", encoding="utf-8")
    (folder / "test.tsv").write_text("0\tmeh\n", encoding="utf-8")
    params["ingest"]["labeled"] = {"train": "train.jsonl", "text_column": "t", "label_column": "y",
                                   "dev": "dev.tsv", "test": "test.tsv"}
    with pytest.raises(InputError, match="no column 't'|header: false"):  # jsonl names don't fit the tsv files
        ingest(params, folder)
    (folder / "dev.jsonl").write_text(json.dumps({"t": "good one", "y": 1}) + "\n")
    (folder / "test.jsonl").write_text(json.dumps({"t": "meh", "y": 0}) + "\n")
    params["ingest"]["labeled"].update(dev="dev.jsonl", test="test.jsonl")
    ingest(params, folder)
    assert labeled_rows(folder, "dev") == [{"text": "good one", "label": "1", "label_id": 1}]
    params["ingest"]["labeled"] = {"train": "dev.tsv", "dev": "dev.tsv", "test": "test.tsv", "header": False,
                                   "text_column": 1, "label_column": 0}
    ingest(params, folder)
    assert labeled_rows(folder, "test") == [{"text": "meh", "label": "0", "label_id": 0}]


BAD_TRAIN = "sentence\tlabel\ngood\t1\n\t0\nno label here\t\nbad\t0\n"
BAD_DEV = "sentence\tlabel\nfine\t1\nodd\t7\nodder\t9\n"


def test_bad_rows_are_dropped_and_reported(tiny):
    params, folder = tiny
    (folder / "train.tsv").write_text(BAD_TRAIN, encoding="utf-8")
    (folder / "dev.tsv").write_text(BAD_DEV, encoding="utf-8")
    figures = ingest(params, folder)
    assert figures["labeled"]["dropped"]["train"] == {
        "empty_text": {"count": 1, "first_lines": [3]}, "missing_label": {"count": 1, "first_lines": [4]}}
    assert figures["labeled"]["dropped"]["dev"] == {"unseen_label": {"count": 2, "first_lines": [3, 4]}}
    assert [row["text"] for row in labeled_rows(folder, "train")] == ["good", "bad"]


@pytest.mark.parametrize("split, content, message", [
    ("train", BAD_TRAIN, r"train.tsv: 1 rows with empty text \(lines 3\); 1 rows with missing label \(lines 4\)"),
    ("dev", BAD_DEV, r"dev.tsv: 2 rows with unseen label \(lines 3, 4\)"),
])
def test_bad_rows_can_be_fatal(tiny, split, content, message):
    params, folder = tiny
    (folder / f"{split}.tsv").write_text(content, encoding="utf-8")
    params["ingest"]["labeled"]["on_bad_row"] = "fail"
    with pytest.raises(InputError, match=message):
        ingest(params, folder)
    assert outputs_left(folder) == []


# ------------------------------------------------------------------ bad input: message, nothing left behind


def corrupt_binary(folder):
    (folder / "corpus" / "b.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    return r"b.txt: looks like a binary file \(NUL byte at offset 4\)"


def corrupt_encoding(folder):
    (folder / "corpus" / "b.txt").write_bytes(b"Some valid text. Then " + b"\xff\xfe latin junk.")
    return r"b.txt: not valid UTF-8 at byte offset 22"


def corrupt_empty(folder):
    (folder / "corpus" / "a.txt").write_text("Tiny.\n\nAlso tiny.\n", encoding="utf-8")
    return r"nothing left after cleaning \(2 documents read, dropped: \{'too_short': 2\}"


def corrupt_jsonl(folder):
    (folder / "corpus" / "c.jsonl").write_text('{"text": "fine line here"}\n{"text": broken\n', encoding="utf-8")
    return r"c.jsonl: line 2: not valid JSON"


def corrupt_column(folder):
    (folder / "test.tsv").write_text("text\tlabel\nsomething\t1\n", encoding="utf-8")
    return r"test.tsv: no column 'sentence' \(ingest.labeled.text_column\); the header has \['text', 'label'\]"


def corrupt_empty_folder(folder):
    for path in (folder / "corpus").iterdir():
        path.unlink()
    return r"corpus: no .txt, .md, .jsonl \(optionally .gz/.xz/.zst compressed\) files in this folder"


def corrupt_gzip(folder):
    (folder / "corpus" / "d.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    return r"d.txt.gz: cannot read"


@pytest.mark.parametrize("corrupt", [corrupt_binary, corrupt_encoding, corrupt_empty, corrupt_jsonl,
                                     corrupt_column, corrupt_empty_folder, corrupt_gzip])
def test_bad_input_names_the_file_and_keeps_previous_outputs(tiny, corrupt):
    params, folder = tiny
    ingest(params, folder)
    before = {p: (folder / p).read_bytes() for p in outputs_left(folder)}
    message = corrupt(folder)
    with pytest.raises(InputError, match=message):
        ingest(params, folder)
    assert {p: (folder / p).read_bytes() for p in outputs_left(folder)} == before
    assert not [p for p in (folder / "data").iterdir() if p.name.startswith(".")], "temporary folder left"


def test_bad_input_on_a_fresh_root_leaves_nothing(tiny):
    params, folder = tiny
    corrupt_binary(folder)
    with pytest.raises(InputError):
        ingest(params, folder)
    assert outputs_left(folder) == []
    assert not (folder / "data").exists() or not any((folder / "data").rglob("*.parquet"))


def test_decode_error_skip_and_replace(tiny):
    params, folder = tiny
    (folder / "corpus" / "b.txt").write_bytes(b"Broken \xff bytes are here in this long enough document. Yes.")
    params["ingest"]["corpus"]["heldout_fraction"] = 0.5
    params["ingest"]["corpus"]["on_decode_error"] = "skip"
    ingest(params, folder)
    manifest = json.loads((folder / "data" / "corpus" / "manifest.json").read_text())
    assert [os.path.basename(p) for p in manifest["sources"][0]["skipped_files"]] == ["b.txt"]
    params["ingest"]["corpus"]["on_decode_error"] = "replace"
    ingest(params, folder)
    sentences = {s for split in ("train", "heldout") for d in documents(folder, split) for s in d["sentences"]}
    assert "Broken \ufffd bytes are here in this long enough document." in sentences


def test_hf_source_offline_gives_a_clear_error(tiny):
    params, folder = tiny
    params["ingest"]["corpus"]["sources"] = [{"path": "hf:wikitext:wikitext-2-raw-v1"}]
    path = write_params(folder, params)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(path), "--root", str(folder),
                             "ingest"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "hf:wikitext:wikitext-2-raw-v1: cannot load this dataset from the Hugging Face hub" in result.stderr
    assert "Traceback" not in result.stderr
    assert outputs_left(folder) == []


# ---------------------------------------------------------------- streaming


def generated_corpus(path, documents: int) -> int:
    """``documents`` distinct paragraphs of ~1 kB in one gzip file; returns the text's size in bytes."""
    words = ("river", "stone", "orchard", "lantern", "harbour", "meadow", "signal", "copper")
    size = 0
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for n in range(documents):
            sentence = " ".join(words[(n >> k) % len(words)] for k in range(0, 24, 3))
            paragraph = " ".join(f"Document {n} line {i} tells of the {sentence}." for i in range(12)) + "\n\n"
            handle.write(paragraph)
            size += len(paragraph)
    return size


def traced_ingest(settings, source, out, documents: int) -> tuple[int, int, dict]:
    """(corpus bytes, peak Python heap while ingesting it, manifest) for a generated corpus of ``documents``."""
    import tracemalloc

    from tasks.ingest import write_corpus

    for old in source.glob("*"):
        old.unlink()
    size = generated_corpus(source / "big.txt.gz", documents)
    out.mkdir()
    tracemalloc.start()
    try:
        manifest = write_corpus(settings, out)
        return size, tracemalloc.get_traced_memory()[1], manifest
    finally:
        tracemalloc.stop()


def test_the_corpus_streams_through_in_row_groups_with_bounded_memory(tiny):
    """Three times the corpus adds a small fraction of the extra text to the peak Python heap (the old reader
    held every document: more than the text itself), and parquet is written batch_documents at a time."""
    from bertflow.params import load_params
    from tasks.ingest import write_corpus

    params, folder = tiny
    params["ingest"]["corpus"].update({"batch_documents": 100, "heldout_fraction": 0.1})
    settings = load_params(write_params(folder, params)).ingest.corpus
    write_corpus(settings.model_copy(update={"heldout_fraction": 0.178}), folder)  # imports etc. not counted below
    small = traced_ingest(settings, folder / "corpus", folder / "small", 600)
    large = traced_ingest(settings, folder / "corpus", folder / "large", 1800)
    manifest = large[2]
    assert manifest["documents_read"] == 1800 and manifest["dropped"] == {}
    assert manifest["train"]["documents"] + manifest["heldout"]["documents"] == 1800
    growth = (large[1] - small[1]) / (large[0] - small[0])
    assert growth < 0.2, f"peak heap {small[1] / 1e6:.2f} → {large[1] / 1e6:.2f} MB for text " \
                         f"{small[0] / 1e6:.2f} → {large[0] / 1e6:.2f} MB"
    train = pq.ParquetFile(folder / "large" / "train.parquet")
    assert train.metadata.num_rows == manifest["train"]["documents"]
    assert train.metadata.num_row_groups == -(-manifest["train"]["documents"] // 100)


def test_an_hf_source_streams_from_a_local_dataset(tiny):
    """The hf: reader on a dataset folder ``datasets`` loads offline (records are lines, blank records end
    documents), read in batches."""
    params, folder = tiny
    dataset = folder / "wiki"
    dataset.mkdir()
    lines = ["The first article has a sentence that is long enough to keep.", "It goes on here.", "",
             "The second article also has a sentence long enough to keep.", ""] * 3
    lines = [line.replace("article", f"article {i // 5}") if line else line for i, line in enumerate(lines)]
    (dataset / "train.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    params["ingest"]["corpus"]["sources"] = [{"path": f"hf:{dataset}"}]
    params["ingest"]["corpus"]["heldout_fraction"] = 0.5
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(write_params(folder, params)),
                             "--root", str(folder), "ingest"], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    found = documents(folder, "train") + documents(folder, "heldout")
    assert len(found) == 6
    assert {tuple(d["sentences"]) for d in found} >= {
        ("The first article 0 has a sentence that is long enough to keep.", "It goes on here.")}
