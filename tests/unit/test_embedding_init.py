"""``pretrain.embedding_init_std``: the embedding tables drawn at the given scale (padding row zero), for either
architecture and for ELECTRA's shared tables; and why it exists: at BERT's 0.02, pre-LN BERT's output hardly
varies along the sequence at initialisation, post-LN BERT's does, and a larger scale gives pre-LN that back."""

import pytest
import torch

from bertflow import electra
from bertflow.model import construct_config, construct_pretraining_model
from bertflow.params import BertModelParams

SIZES = BertModelParams(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def model(architecture: str, std: float | None):
    return construct_pretraining_model(construct_config(SIZES, 3000, 0, architecture), seed=0, embedding_std=std)


def positional_spread(encoder) -> float:
    """How much the encoder's output varies along the sequence, relative to how much it varies at all."""
    ids = torch.randint(5, 3000, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    return float(hidden.std(dim=1).mean() / hidden.std())


@pytest.mark.parametrize("architecture", ["bert", "megatron_bert"])
def test_embedding_tables_are_drawn_at_the_given_scale(architecture):
    embeddings = model(architecture, 0.3).bert.embeddings
    words = embeddings.word_embeddings.weight
    assert float(words[1:].std()) == pytest.approx(0.3, rel=0.05)
    assert float(embeddings.position_embeddings.weight.std()) == pytest.approx(0.3, rel=0.1)
    assert bool((words[0] == 0).all())  # pad_token_id 0 stays the zero row
    assert float(model(architecture, None).bert.embeddings.word_embeddings.weight.std()) == pytest.approx(
        0.02, rel=0.05)  # unset: the config's initializer_range


def test_electra_draws_the_shared_tables_at_the_given_scale():
    config = construct_config(SIZES, 3000, 0, "megatron_bert")
    words = electra.construct(config, 0.25, 0, embedding_std=0.3).discriminator.embeddings.word_embeddings.weight
    assert float(words[1:].std()) == pytest.approx(0.3, rel=0.05)


def test_pre_layernorm_loses_the_positions_at_bert_scale_and_keeps_them_at_a_larger_one():
    post_ln, pre_ln = positional_spread(model("bert", None).bert), positional_spread(model("megatron_bert", None).bert)
    rescaled = positional_spread(model("megatron_bert", 0.1).bert)
    assert pre_ln < 0.6 * post_ln  # 0.02: the first attention layer's output, the same at every position, dominates
    assert rescaled > 1.5 * pre_ln
