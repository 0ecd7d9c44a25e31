"""The attention stage on the tiny trained project: weights are softmax rows, drawings and report exist."""

import json

import numpy as np
import pytest

from bertflow.io import InputError
from tests.conftest import REPO, copy_outputs


def test_attention_rows_sum_to_one_and_views_are_drawn(tiny_trained, tmp_path):
    from bertflow.params import AttentionSentence
    from bertflow.tokenization import load_tokenizer
    from tasks.attention import encode, load_encoder, token_attention
    from tasks.cli import run_stage

    sentence = AttentionSentence(text="The animal didn't cross the street because it was too tired", token="it")
    tokenizer = load_tokenizer(tiny_trained / "artifacts" / "classifier")
    inputs, pieces, index = encode(tokenizer, sentence)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and pieces[index] == "it"
    for folder in ("pretrained", "classifier"):
        model = load_encoder(tiny_trained / "artifacts" / folder)
        weights = token_attention(model, inputs, index)
        config = model.config
        assert weights.shape == (config.num_hidden_layers, config.num_attention_heads, len(pieces))
        assert np.allclose(weights.sum(axis=-1), 1.0, atol=1e-5)  # each head: a distribution over the keys
        assert (weights >= 0).all()

    root = copy_outputs(tiny_trained, tmp_path / "project")
    figures = run_stage("attention", REPO / "params.tiny.yaml", root)
    view = figures["sentences"][0]
    assert view["pieces"][view["token_index"]] == "it"
    layers = len(view["pretrained"]["head_mean"])
    assert len(view["classifier"]["strongest_per_layer"]) == layers
    drawn = sorted(p.name for p in (root / "reports" / "attention").iterdir())
    assert drawn == ["1_classifier.png", "1_mean.png", "1_pretrained.png", "1_weights.json"]
    assert all((root / "reports" / "attention" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
               for name in drawn if name.endswith(".png"))
    every_head = json.loads((root / "reports" / "attention" / "1_weights.json").read_text())
    assert np.allclose(np.array(every_head["classifier"]).sum(axis=-1), 1.0, atol=1e-4)
    assert json.loads((root / "reports" / "attention.json").read_text()) == figures


def test_a_token_not_in_the_sentence_is_named(tiny_trained):
    from bertflow.params import AttentionSentence
    from bertflow.tokenization import load_tokenizer
    from tasks.attention import encode

    tokenizer = load_tokenizer(tiny_trained / "artifacts" / "classifier")
    with pytest.raises(InputError, match="'elephant' is not a word of"):
        encode(tokenizer, AttentionSentence(text="The animal was tired", token="elephant"))
