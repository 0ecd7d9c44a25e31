"""The encoder families bertflow builds, trains and serves; reads and writes nothing.

- ``bert``: BERT as published (post-LayerNorm: each sub-layer's output is added to its input, then
  normalised), transformers' ``Bert*`` classes.
- ``megatron_bert``: the pre-LayerNorm BERT of Megatron-LM (each sub-layer normalises its input, and
  one LayerNorm ends the encoder), transformers' ``MegatronBert*`` classes. Pre-LN trains stably at the
  high peak learning rates short budgets need (Cramming; Izsak et al. 2021).

``pretrain.architecture`` names the family (``megatron_bert``); a saved ``config.json`` its
``model_type`` (``megatron-bert``). Both have segment embeddings, an NSP head and the same module
names (``bert``, ``cls.predictions``, ``cls.seq_relationship``), and transformers' Auto classes load
either from the ``model_type`` of its ``config.json``, so a consumer of a saved folder needs nothing of
bertflow.
"""

from __future__ import annotations

from bertflow.io import InputError

ARCHITECTURES = {"bert": "post-LayerNorm BERT", "megatron_bert": "pre-LayerNorm BERT (MegatronBert)"}
MODEL_TYPES = {"bert": "bert", "megatron-bert": "megatron_bert"}  # config.json's model_type -> architecture


def config_class(architecture: str):
    """The transformers config class of ``architecture`` (a ``pretrain.architecture`` value)."""
    from transformers import BertConfig, MegatronBertConfig

    return {"bert": BertConfig, "megatron_bert": MegatronBertConfig}[architecture]


def pretraining_class(architecture: str):
    """The MLM + NSP model class of ``architecture`` (``bert`` and ``cls`` inside, whichever it is)."""
    from transformers import BertForPreTraining, MegatronBertForPreTraining

    return {"bert": BertForPreTraining, "megatron_bert": MegatronBertForPreTraining}[architecture]


def encoder_class(architecture: str):
    """The bare encoder class of ``architecture`` (``BertModel`` or ``MegatronBertModel``): ELECTRA's
    discriminator and generator, and what an ELECTRA run saves as the pretrained model."""
    from transformers import BertModel, MegatronBertModel

    return {"bert": BertModel, "megatron_bert": MegatronBertModel}[architecture]


def architecture_of(model_type: str | None, where: str) -> str:
    """The architecture of a config's ``model_type``; one error naming it and what is supported otherwise."""
    if model_type not in MODEL_TYPES:
        raise InputError(f"{where}: model_type {model_type!r} is not supported; supported: "
                         + ", ".join(f"{kind} ({ARCHITECTURES[name]})" for kind, name in MODEL_TYPES.items()))
    return MODEL_TYPES[model_type]


def set_attention(model, attention: str) -> None:
    """Choose the attention kernel (``eager`` or ``sdpa``) where the family lets one choose; MegatronBert
    only has eager attention, which it keeps."""
    if model.config.model_type == "bert":
        model.set_attn_implementation(attention)
