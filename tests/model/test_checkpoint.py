"""Starting from an existing BERT (``pretrain.init``): the checkpoint kinds, the adopted vocabulary, the
refusals, the hub cache offline, and the tiny chain from a checkpoint through register, where the
registry makes the better of the two routes champion.

The checkpoints are made here from the session's tiny pretrained model (``tiny_trained``): as it is
(a ``BertForPreTraining``), as a bare ``BertModel`` and as a ``BertForMaskedLM``, and as a hub-cache entry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertForMaskedLM, BertForPreTraining, BertModel

from bertflow import checkpoints as ck
from bertflow.io import InputError
from bertflow.tokenization import load_tokenizer
from tasks.cli import run_stage
from tests.conftest import REPO, copy_outputs

TINY = REPO / "params.tiny.yaml"
SHORT = {"pretrain.max_steps": 10, "pretrain.eval_every": 10, "pretrain.checkpoint_every_steps": 10}


def report(root: Path, stage: str) -> dict:
    return json.loads((root / "reports" / f"{stage}.json").read_text())


def make_checkpoint(pretrained: Path, folder: Path, kind: str) -> Path:
    """The tiny pretrained model saved as ``kind`` (its own heads only), with its tokenizer."""
    full = BertForPreTraining.from_pretrained(str(pretrained))
    if kind == "BertModel":
        model = full.bert
    elif kind == "BertForMaskedLM":
        model = BertForMaskedLM(full.config)
        model.bert.load_state_dict(full.bert.state_dict(), strict=False)  # BertForMaskedLM has no pooler
        model.cls.predictions.load_state_dict(full.cls.predictions.state_dict())
    else:
        model = full
    model.save_pretrained(str(folder))
    load_tokenizer(pretrained).save_pretrained(str(folder))
    return folder


@pytest.fixture
def started(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny data stages' outputs (pretraining data built with the tiny vocabulary)."""
    return copy_outputs(tiny_run, tmp_path / "project")


def continue_from(root: Path, init: Path | str, **extra) -> dict:
    """The tokenizer stage (adopting) and pretrain, from ``init``; the tiny vocabulary is the checkpoint's,
    so the data stages' shards stay valid. Returns reports/pretrain.json."""
    overrides = {"pretrain.init": str(init), **SHORT, **extra}
    run_stage("tokenizer", TINY, root, overrides)
    run_stage("pretrain", TINY, root, overrides)
    return report(root, "pretrain")


# ---------------------------------------------------------------- loading (library)


@pytest.mark.parametrize("kind, new", [("BertForPreTraining", []), ("BertForMaskedLM", ["nsp_head", "pooler"]),
                                       ("BertModel", ["mlm_head", "nsp_head"])])
def test_each_kind_loads_with_its_missing_heads_initialised(tiny_trained, tmp_path, kind, new):
    pretrained = tiny_trained / "artifacts" / "pretrained"
    checkpoint = ck.resolve(str(make_checkpoint(pretrained, tmp_path / kind, kind)))
    sizes = model_params(ck.read_config(checkpoint))
    model, heads = ck.load_pretraining_model(checkpoint, ck.starting_config(checkpoint, sizes), seed=3)
    assert heads == new
    source = BertForPreTraining.from_pretrained(str(pretrained))
    for name, value in source.bert.encoder.state_dict().items():  # the encoder is the checkpoint's
        assert torch.equal(value, model.bert.encoder.state_dict()[name]), name
    decoder, embeddings = model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() == embeddings.data_ptr()  # the MLM decoder is tied to the word embeddings
    again, _ = ck.load_pretraining_model(checkpoint, ck.starting_config(checkpoint, sizes), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))  # new heads: the same from the same seed


def model_params(config):
    from bertflow.params import BertModelParams

    return BertModelParams(**{key: getattr(config, key) for key in ck.ARCHITECTURE_KEYS})


def test_a_contradicting_model_section_names_every_key(tiny_trained, started):
    with pytest.raises(InputError) as error:
        continue_from(started, tiny_trained / "artifacts" / "pretrained", **{"pretrain.model.hidden_size": 32,
                                                                             "pretrain.model.num_hidden_layers": 3})
    message = str(error.value)
    assert "pretrain.model contradicts" in message and "hidden_size is 32 but the checkpoint has 64" in message
    assert "num_hidden_layers is 3 but the checkpoint has 2" in message and "intermediate_size" not in message
    assert not (started / "artifacts" / "pretrained").exists()


def test_what_is_not_a_safe_bert_is_refused_by_name(tiny_trained, tmp_path):
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    save_file({"w": torch.zeros(1)}, str(other / "model.safetensors"))
    with pytest.raises(InputError, match=r"is a gpt2 checkpoint \(GPT2LMHeadModel\); supported: BERT"):
        ck.read_config(ck.resolve(str(other)))

    pickled = make_checkpoint(tiny_trained / "artifacts" / "pretrained", tmp_path / "pickled", "BertModel")
    torch.save(BertModel.from_pretrained(str(pickled)).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()  # what older checkpoints on the hub look like
    with pytest.raises(InputError, match=r"only pickled weights \(pytorch_model.bin\).*convert them once"):
        ck.read_config(ck.resolve(str(pickled)))
    with pytest.raises(InputError, match="not a checkpoint folder"):
        ck.resolve(str(tmp_path))


# ---------------------------------------------------------------- the stages


def padded_copy(pretrained: Path, folder: Path) -> Path:
    """The tiny pretrained model with padding and truncation switched on in its tokenizer.json, as
    sentence-transformers saves its checkpoints (all-MiniLM-L6-v2: padded and cut at 128)."""
    shutil.copytree(pretrained, folder)
    raw = json.loads((folder / "tokenizer.json").read_text())
    raw["padding"] = {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "[PAD]"}
    raw["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(raw))
    return folder


def test_continued_pretraining_adopts_the_vocabulary_and_starts_where_the_checkpoint_ended(tiny_trained, started,
                                                                                           tmp_path):
    checkpoint = padded_copy(tiny_trained / "artifacts" / "pretrained", tmp_path / "checkpoint")
    figures = continue_from(started, checkpoint)
    assert figures["start"] == {"init": str(checkpoint), "new_heads": []}
    scratch = report(tiny_trained, "pretrain")
    # step 0 is the checkpoint itself: the held-out figures it ended its own pretraining with
    assert {k: figures["heldout_at_start"][k] for k in ("mlm_loss", "mlm_accuracy", "nsp_accuracy")} == \
        {k: scratch["heldout"][k] for k in ("mlm_loss", "mlm_accuracy", "nsp_accuracy")}
    assert figures["heldout_at_start"]["step"] == 0 and figures["heldout"]["step"] == 10
    assert (started / "reports" / "pretrain" / "eval.csv").read_text().splitlines()[1].startswith("0,")

    adopted, own = load_tokenizer(started / "artifacts" / "tokenizer"), load_tokenizer(checkpoint)
    text = "The animal didn't cross the street because it was too tired, so it lay down by the wall."
    assert adopted(text)["input_ids"] == own(text, padding=False, truncation=False)["input_ids"]
    assert adopted.get_vocab() == own.get_vocab()
    pieces = adopted.backend_tokenizer.encode(text, add_special_tokens=False).ids  # as the data stages encode
    assert len(pieces) > 16 and adopted.pad_token_id not in pieces  # neither cut nor padded
    fit = report(started, "tokenizer")
    assert fit["source"] == "checkpoint" and fit["init"] == str(checkpoint)
    for figures_of in (fit, fit["trained_here"]):
        assert 0 <= figures_of["heldout_unk_rate"] < 0.05 and 1.0 <= figures_of["labeled_pieces_per_word"] < 3


def hub_entry(cache: Path, repo: str, checkpoint: Path) -> str:
    """A hub-cache entry for ``repo`` as huggingface_hub lays it out (refs/main → snapshots/<commit>)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(checkpoint, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return commit


def test_an_hf_id_resolves_offline_from_the_hub_cache(tiny_trained, started, tmp_path):
    """Through the hub cache transformers itself uses, with HF_HUB_OFFLINE=1 (a fresh process: the hub
    library reads both settings when it is imported)."""
    bare = make_checkpoint(tiny_trained / "artifacts" / "pretrained", tmp_path / "bare", "BertModel")
    commit = hub_entry(tmp_path / "hub", "local/tiny-bert", bare)
    code = ("import json, sys; from tasks.cli import run_stage; o = json.loads(sys.argv[2]); "
            "[run_stage(s, sys.argv[1], sys.argv[3], o) for s in ('tokenizer', 'pretrain')]")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", code, str(TINY), json.dumps({"pretrain.init": "hf:local/tiny-bert",
                                                                               **SHORT}), str(started)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report(started, "pretrain")["start"] == {"init": "hf:local/tiny-bert", "revision": commit,
                                                    "new_heads": ["mlm_head", "nsp_head"]}
    missing = subprocess.run([sys.executable, "-c", code, str(TINY), json.dumps({"pretrain.init": "hf:local/absent"}),
                              str(started)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "hf:local/absent is not in the hub cache" in missing.stderr
    assert "(HF_HUB_OFFLINE is set)" in missing.stderr


def test_the_tiny_chain_from_a_checkpoint_registers_and_the_better_route_is_champion(tiny_trained, tmp_path,
                                                                                     monkeypatch):
    """Every later stage runs unchanged on a model continued from a bare BertModel; registered beside the
    scratch route under one name and the same test data, the better of the two is champion."""
    from tests.registry.test_register import client_for, register_here

    scratch = copy_outputs(tiny_trained, tmp_path / "scratch")
    register_here(scratch, monkeypatch)
    store = f"sqlite:///{scratch / 'mlruns' / 'mlflow.db'}"

    root = copy_outputs(tiny_trained, tmp_path / "continued")
    bare = make_checkpoint(tiny_trained / "artifacts" / "pretrained", tmp_path / "bare", "BertModel")
    overrides = {"pretrain.init": str(bare), **SHORT, "optimize.variants": ["int8", "onnx", "student"]}
    for stage in ("tokenizer", "pretrain", "finetune", "evaluate", "attention", "optimize"):
        run_stage(stage, TINY, root, overrides)
    register_here(root, monkeypatch, store, overrides)
    run_stage("report", TINY, root, overrides)

    assert report(root, "pretrain")["start"]["new_heads"] == ["mlm_head", "nsp_head"]
    assert set(report(root, "optimize")["variants"]) >= {"int8", "onnx", "student"}
    assert "pretrain.init" in (root / "reports" / "report.html").read_text()
    client = client_for(store)
    accuracy = {route: report(folder, "evaluate")["test"]["accuracy"] for route, folder in
                (("scratch", scratch), ("continued", root))}
    champion = client.get_model_version_by_alias("bertflow-tiny", "champion")
    versions = {route: report(folder, "register")["version"] for route, folder in
                (("scratch", scratch), ("continued", root))}
    # a tie keeps the first; a new champion's variants are registered just before it, so the numbers vary
    expected = versions["continued"] if accuracy["continued"] > accuracy["scratch"] else versions["scratch"]
    assert str(champion.version) == expected, (accuracy, champion.tags.get("gate.reason"))
    latest = max(client.search_model_versions("name='bertflow-tiny'"), key=lambda v: int(v.version))
    assert str(latest.version) == versions["continued"] and latest.tags["variant"] == "fp32"

