"""Building BERT models from params and computing their losses; shared by pretrain, finetune, evaluate.

Reads and writes nothing. ``construct_*`` builds a model from params; ``load_*`` loads a saved one
and checks it against its tokenizer, so a vocabulary or position mismatch is an error message
instead of an IndexError or NaNs deep inside the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from bertflow import architectures
from bertflow.io import InputError


def construct_config(model_params, vocab_size: int, pad_token_id: int, architecture: str = "bert") -> PretrainedConfig:
    """The ``architecture``'s config (every field given: MegatronBert's defaults are 24 × 1024) from the
    ``pretrain.model`` section and the tokenizer's vocabulary size."""
    return architectures.config_class(architecture)(vocab_size=vocab_size, pad_token_id=pad_token_id,
                                                    type_vocab_size=2, **model_params.model_dump())


def check_vocab(config: PretrainedConfig, vocab_size: int, where: str) -> None:
    if config.vocab_size != vocab_size:
        raise InputError(f"{where}: the model has vocab_size {config.vocab_size} but the tokenizer has "
                         f"{vocab_size} tokens; they must be the same (retrain the model, or use its own tokenizer)")


def check_positions(config: PretrainedConfig, max_seq_length: int, where: str) -> None:
    if max_seq_length > config.max_position_embeddings:
        raise InputError(f"{where}: sequences of up to {max_seq_length} tokens but the model has only "
                         f"max_position_embeddings={config.max_position_embeddings}")


def construct_pretraining_model(config: PretrainedConfig, seed: int, attention: str = "sdpa",
                                embedding_std: float | None = None) -> PreTrainedModel:
    """Random weights from ``seed``; ``attention`` ("eager" or "sdpa") is a run-time choice, not saved;
    ``embedding_std``: the embedding tables' initial standard deviation (``init_embeddings``)."""
    torch.manual_seed(seed)
    model = architectures.pretraining_class(architectures.architecture_of(config.model_type, "model config"))(config)
    init_embeddings(model.bert.embeddings, embedding_std)
    architectures.set_attention(model, attention)
    return model


@torch.no_grad()
def init_embeddings(embeddings: torch.nn.Module, std: float | None) -> None:
    """Draw the word-piece, position and segment tables again from normal(0, ``std``) (None: keep the config's
    ``initializer_range``), the padding row zero as before. The word-piece table is also the masked LM's output
    layer (tied), so a larger ``std`` also widens the initial logits."""
    if std is None:
        return
    for table in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings):
        table.weight.normal_(0.0, std)
        if table.padding_idx is not None:
            table.weight[table.padding_idx].zero_()


def load_classifier(path: Path, labels: list[str] | None = None, dropout: float | None = None,
                    random_init: bool = False, encoder_dropout: float | None = None) -> PreTrainedModel:
    """A sequence classifier from a saved BERT (pretraining or classification layout).

    With ``labels`` the head is (re)built for them and ``id2label``/``label2id`` go into the config;
    ``random_init`` keeps the architecture but not the weights (the no-pretraining ablation);
    ``encoder_dropout`` replaces the encoder's dropout rates (pretraining may have run without).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no transformers model here (config.json missing)")
    config = AutoConfig.from_pretrained(str(path))
    architectures.architecture_of(config.model_type, str(path))
    extra = {}
    if labels is not None:
        extra = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                 "label2id": {label: i for i, label in enumerate(labels)}}
    if dropout is not None:
        extra["classifier_dropout"] = dropout
    if encoder_dropout is not None:
        extra.update(hidden_dropout_prob=encoder_dropout, attention_probs_dropout_prob=encoder_dropout)
    config.update(extra)  # on the config, not as from_pretrained keywords: MegatronBert has no classifier_dropout
    if random_init:
        return AutoModelForSequenceClassification.from_config(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the pretraining heads it drops are expected, not news
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), config=config,
                                                                  ignore_mismatched_sizes=labels is not None)
    finally:
        hf_logging.set_verbosity(verbosity)


@dataclass
class PretrainingOutput:
    """One batch's losses and counts; the figures an objective lacks stay zero (NSP without pairs, RTD
    without ELECTRA). ``rtd_scores``/``rtd_labels``: the discriminator's logits and the replaced flags at every
    scored position, for the held-out ROC-AUC."""

    loss: torch.Tensor
    mlm_loss: torch.Tensor
    nsp_loss: torch.Tensor
    mlm_correct: int
    mlm_count: int
    nsp_correct: int
    nsp_count: int
    rtd_loss: torch.Tensor | None = None
    rtd_correct: int = 0
    rtd_count: int = 0
    rtd_scores: torch.Tensor | None = None
    rtd_labels: torch.Tensor | None = None


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the masked positions (in fp32) and how many the argmax gets right."""
    return F.cross_entropy(logits.float(), targets), (logits.argmax(-1) == targets).sum()


def compiled_masked_lm_loss():
    """``masked_lm_loss`` through ``torch.compile``: one fused pass over the (masked × vocabulary) logits.

    Eager PyTorch makes about ten passes (cast, log-softmax, its backward, argmax); with a
    30522-word vocabulary those passes cost more than the decoder's matmul on two CPU cores.
    Needs a C++ compiler at run time (inductor); ``pretrain.compile_loss: false`` turns it off.
    """
    return torch.compile(masked_lm_loss, dynamic=True)


def pretraining_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                     mlm_loss=masked_lm_loss, nsp: bool = True) -> PretrainingOutput:
    """MLM cross-entropy (on the masked positions only) + NSP cross-entropy (``nsp``: objective mlm_nsp).

    Same value as ``BertForPreTraining``'s (or ``MegatronBertForPreTraining``'s) own loss, without
    projecting the unmasked positions onto the vocabulary: that projection is most of a small model's
    compute. ``mlm_loss`` is ``masked_lm_loss`` or its compiled form. Without ``nsp`` (objective mlm) the
    NSP head is not run and the loss is the MLM loss alone.
    """
    hidden, pooled = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"], return_dict=False)[:2]
    labels = batch["labels"]
    selected = labels != -100
    targets = labels[selected]
    mlm, mlm_correct = mlm_loss(model.cls.predictions(hidden[selected]), targets)
    if not nsp:
        return PretrainingOutput(loss=mlm, mlm_loss=mlm, nsp_loss=torch.zeros((), device=mlm.device),
                                 mlm_correct=int(mlm_correct), mlm_count=int(targets.numel()), nsp_correct=0,
                                 nsp_count=0)
    nsp_logits = model.cls.seq_relationship(pooled)
    nsp_loss = F.cross_entropy(nsp_logits.float(), batch["next_sentence_label"])
    return PretrainingOutput(
        loss=mlm + nsp_loss, mlm_loss=mlm, nsp_loss=nsp_loss,
        mlm_correct=int(mlm_correct), mlm_count=int(targets.numel()),
        nsp_correct=int((nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum()),
        nsp_count=int(nsp_logits.shape[0]))
