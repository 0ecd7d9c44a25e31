"""Stage tokenizer: AutoTokenizer round trip, train-split only, BERT's Chinese handling, figures."""

import json

import pyarrow.parquet as pq
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from tasks.cli import run_stage
from tasks.tokenizer import SPECIAL_TOKENS
from tests.conftest import write_params


def test_autotokenizer_round_trip_gives_the_same_ids(tiny_run):
    folder = tiny_run / "artifacts" / "tokenizer"
    loaded = AutoTokenizer.from_pretrained(str(folder))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert loaded.is_fast and type(loaded).__name__ == "BertTokenizer"
    assert loaded.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    text = "The animal didn't cross the street because it was too tired."
    pair = loaded(text, "Café au lait.")
    assert pair["input_ids"] == raw.encode(text, "Café au lait.").ids
    assert pair["input_ids"][0] == loaded.cls_token_id and pair["input_ids"][-1] == loaded.sep_token_id
    assert set(pair["token_type_ids"]) == {0, 1}
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == \
        "the animal didn ' t cross the street because it was too tired."
    vocab_lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab_lines == loaded.convert_ids_to_tokens(list(range(len(loaded))))


def test_figures_are_sane(tiny_run):
    figures = json.loads((tiny_run / "reports" / "tokenizer.json").read_text())
    assert figures["vocab_size"] == 2000
    assert 0 <= figures["heldout_unk_rate"] < 0.01
    assert 1.0 <= figures["heldout_pieces_per_word"] < 2.5


def test_trains_on_train_text_only(tiny):
    params, folder = tiny
    words = ["zq" + chr(97 + i % 26) + chr(97 + i // 26) for i in range(40)]
    (folder / "corpus" / "b.txt").write_text("\n\n".join(
        f"Document {i} repeats one word. " + f"{word} " * 20 for i, word in enumerate(words)), encoding="utf-8")
    (folder / "test.tsv").write_text("sentence\tlabel\n" + "testonlyword " * 30 + "\t1\n")
    params["tokenizer"]["vocab_size"] = 1000
    params["ingest"]["corpus"]["heldout_fraction"] = 0.5
    path = write_params(folder, params)
    run_stage("ingest", path, folder)
    run_stage("tokenizer", path, folder)
    vocab = AutoTokenizer.from_pretrained(str(folder / "artifacts" / "tokenizer")).get_vocab()
    heldout = pq.read_table(folder / "data" / "corpus" / "heldout.parquet").to_pylist()
    heldout_words = {w for doc in heldout for w in words if any(w in s for s in doc["sentences"])}
    assert 5 < len(heldout_words) < 35
    assert all(word in vocab for word in set(words) - heldout_words)  # the check can fail
    assert not heldout_words & set(vocab) and "testonlyword" not in vocab


def test_chinese_characters_are_single_tokens(tiny):
    params, folder = tiny
    sentences = ["今天天气很好，我们去公园散步。", "公园里有很多人。", "明天可能下雨，我们待在家里看书。",
                 "书很有意思。", "后天去爬山，山上风景很美丽。", "大家都很开心。"]
    docs = ["".join(sentences[i:] + sentences[:i]) for i in range(6)]
    (folder / "corpus" / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    params["ingest"]["corpus"].update(min_document_chars=5, heldout_fraction=0.5)
    path = write_params(folder, params)
    run_stage("ingest", path, folder)
    run_stage("tokenizer", path, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "artifacts" / "tokenizer"))
    assert tokenizer.tokenize("今天公园") == ["今", "天", "公", "园"]
