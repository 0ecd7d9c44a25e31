"""AdamW's parameter groups: weight decay on the weight matrices and embeddings only, for either architecture
(MegatronBert names its LayerNorms ``ln``, BERT ``LayerNorm``)."""

import pytest
import torch

from bertflow.model import construct_config, construct_pretraining_model
from bertflow.params import BertModelParams
from bertflow.training import parameter_groups


@pytest.mark.parametrize("architecture", ["bert", "megatron_bert"])
def test_no_weight_decay_on_biases_and_every_layernorm(architecture):
    model_params = BertModelParams(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=16)
    model = construct_pretraining_model(construct_config(model_params, 50, 0, architecture), seed=0)
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(param): name for name, param in model.named_parameters()}
    norms = {id(param) for module in model.modules() if isinstance(module, torch.nn.LayerNorm)
             for param in module.parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert norms and norms <= {id(param) for param in no_decay["params"]}
    assert all(names[id(param)].endswith("weight") and id(param) not in norms for param in decay["params"])
    assert all(param.dim() >= 2 for param in decay["params"])  # matrices and embeddings, nothing else
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
