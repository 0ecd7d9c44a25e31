"""params.yaml validation: one message naming the key and what is allowed, before any work."""

import subprocess
import sys

import pytest

from bertflow.params import ParamsError, load_params
from tests.conftest import REPO, outputs_left, write_params


def test_default_params_files_are_valid():
    for name in ("params.yaml", "params.tiny.yaml", "params.zh.yaml"):
        params = load_params(REPO / name)
        assert params.pretrain_data.max_seq_length >= 8


@pytest.mark.parametrize("edit, key, expected", [
    (lambda p: p["tokenizer"].update(vocab_sise=100), "tokenizer.vocab_sise", "allowed keys here: vocab_size"),
    (lambda p: p["pretrain_data"].update(masked_lm_prob=1.5), "pretrain_data.masked_lm_prob", "less than 1"),
    (lambda p: p["pretrain_data"].update(dupe_factor="many"), "pretrain_data.dupe_factor", "valid integer"),
    (lambda p: p["pretrain_data"].update(masking="sometimes"), "pretrain_data.masking", "'static' or 'dynamic'"),
    (lambda p: p["ingest"]["corpus"].update(on_decode_error="ignore"), "ingest.corpus.on_decode_error",
     "'fail', 'skip' or 'replace'"),
    (lambda p: p["ingest"]["corpus"]["sources"].append({"path": "nowhere"}), "ingest.corpus.sources.1.path",
     "path does not exist"),
    (lambda p: p["ingest"]["labeled"].update(train="missing.tsv"), "ingest.labeled.train", "path does not exist"),
    (lambda p: p.update(pretrian={}), "pretrian",
     "allowed keys here: ingest, tokenizer, lm_baselines, pretrain_data, pretrain"),
    (lambda p: p.pop("tokenizer"), "tokenizer", "required key is missing"),
    (lambda p: p["finetune"].update(max_steps=100, budget_minutes=5), "finetune",
     "give at most one of max_steps and budget_minutes"),
    (lambda p: p["pretrain"].update(max_steps=None, budget_minutes=None), "pretrain",
     "give exactly one of max_steps and budget_minutes"),
    (lambda p: p["pretrain"].update(objective="roberta"), "pretrain.objective", "'mlm_nsp', 'mlm' or 'electra'"),
    (lambda p: p["pretrain_data"].update(next_sentence=False), "pretrain.objective",
     "mlm_nsp trains next-sentence prediction but pretrain_data.next_sentence is false"),
    (lambda p: p["pretrain"].update(objective="electra", electra={"generator_size": 0.9},
                                    model={**p["pretrain"]["model"], "num_attention_heads": 4}), "pretrain",
     "electra.generator_size 0.9 gives a generator of hidden_size 29 and 4 heads, which do not divide it"),
    (lambda p: p["pretrain"].update(electra={"rtd_weight": 0}), "pretrain.electra.rtd_weight", "greater than 0"),
    (lambda p: p["pretrain"].update(init="hf:prajjwal1/bert-mini", embedding_init_std=0.1), "pretrain",
     "embedding_init_std 0.1 initialises a model from scratch, but init is hf:prajjwal1/bert-mini"),
])
def test_bad_params_name_the_key(tiny, edit, key, expected):
    params, folder = tiny
    edit(params)
    with pytest.raises(ParamsError) as error:
        load_params(write_params(folder, params))
    line = next(line for line in str(error.value).splitlines() if line.strip().startswith(key + ":"))
    assert expected in line


def test_cli_fails_before_any_work_with_exit_2(tiny):
    params, folder = tiny
    params["pretrain_data"]["masked_lm_prob"] = 1.5
    path = write_params(folder, params)
    result = subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(path), "--root", str(folder),
                             "ingest"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "pretrain_data.masked_lm_prob" in result.stderr and "Traceback" not in result.stderr
    assert outputs_left(folder) == []


def test_overrides_use_dotted_keys(tiny):
    params, folder = tiny
    loaded = load_params(write_params(folder, params), {"tokenizer.vocab_size": 300})
    assert loaded.tokenizer.vocab_size == 300
