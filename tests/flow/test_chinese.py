"""The same pipeline on the Chinese data (params.zh.yaml), shrunk by overrides to a tiny run."""

import json

import pyarrow.parquet as pq
from transformers import AutoTokenizer

from tasks.cli import run_stage
from tests.conftest import REPO

TINY = {"ingest.corpus.max_documents": 80, "ingest.labeled.max_rows": 500, "tokenizer.vocab_size": 3000,
        "tokenizer.limit_alphabet": 2500, "pretrain_data.dupe_factor": 1}


def test_chinese_pipeline_runs_the_data_stages(tmp_path):
    figures = {stage: run_stage(stage, REPO / "params.zh.yaml", tmp_path, TINY)
               for stage in ("ingest", "tokenizer", "pretrain_data")}
    assert figures["ingest"]["labeled"]["labels"] == ["0", "1"]
    sentences = pq.read_table(tmp_path / "data" / "corpus" / "train.parquet")["sentences"].to_pylist()
    assert sum(map(len, sentences)) > 1000
    inner = [s for doc in sentences for s in doc if set("。！？") & set(s.rstrip("。！？”’」』）》"))]
    assert not inner, f"sentences not split at Chinese full stops: {inner[:3]}"
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "artifacts" / "tokenizer"))
    assert tokenizer.tokenize("第一回") == ["第", "一", "回"]
    assert figures["tokenizer"]["heldout_unk_rate"] < 0.02
    assert abs(figures["pretrain_data"]["train"]["nsp_positive_rate"] - 0.5) <= 0.03
    report = json.loads((tmp_path / "reports" / "pretrain_data.json").read_text())
    assert report["train"]["instances"] > 500 and report["train"]["longest_instance"] <= 128
    # the attention view's Chinese sentence: each character is a word, so "它" is found as one piece
    from bertflow.params import load_params
    from tasks.attention import encode

    sentence = load_params(REPO / "params.zh.yaml").attention.sentences[0]
    _, pieces, index = encode(tokenizer, sentence)
    assert pieces[index] == "它" and pieces[0] == "[CLS]"
