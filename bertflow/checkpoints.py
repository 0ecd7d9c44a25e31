"""Starting from an existing BERT: where a ``pretrain.init`` checkpoint lives, what it is, and loading it.

Reads a checkpoint folder in ``save_pretrained`` layout (``config.json``, safetensors weights, the
tokenizer's files): a local folder, or ``hf:<repo id>[@revision]`` resolved through the Hugging Face
hub cache that transformers itself uses (offline with ``HF_HUB_OFFLINE=1`` once cached). Writes
nothing. Only BERT checkpoints are taken, only safetensors weights are read, and no code from a
checkpoint is ever run (the model class is bertflow's own choice, never ``trust_remote_code``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bertflow import architectures
from bertflow.io import InputError
from bertflow.params import HF_PREFIX, SCRATCH

SUPPORTED = ("BERT checkpoints (model_type 'bert' or 'megatron-bert': ...ForPreTraining, ...ForMaskedLM or a bare "
             "...Model)")
# the sizes a checkpoint fixes; pretrain.model must agree with them (its dropout rates are training settings)
ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings")
# parameter-name prefixes of BertForPreTraining's parts that a checkpoint may lack, and their report names
HEADS = {"cls.predictions.": "mlm_head", "cls.seq_relationship.": "nsp_head", "bert.pooler.": "pooler"}
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass(frozen=True)
class Checkpoint:
    spec: str  # as params.yaml writes it: a folder, or hf:<repo id>[@revision]
    path: Path  # the folder holding config.json
    revision: str | None = None  # the hub commit an hf: spec resolved to

    def describe(self) -> dict:
        return {"init": self.spec, **({"revision": self.revision} if self.revision else {})}


def is_scratch(spec: str) -> bool:
    return spec == SCRATCH


def split_hf(spec: str) -> tuple[str, str | None]:
    """``hf:org/name@rev`` → ("org/name", "rev"); no ``@``: revision None (the hub's default branch)."""
    repo, _, revision = spec[len(HF_PREFIX):].partition("@")
    return repo, revision or None


def resolve(spec: str, where: str = "pretrain.init") -> Checkpoint:
    """The folder a checkpoint spec names: a local folder as it is, an hf: id through the hub cache."""
    if not spec.startswith(HF_PREFIX):
        path = Path(spec)
        if not (path / "config.json").is_file():
            raise InputError(f"{where}: {path} is not a checkpoint folder (no config.json; expected the "
                             "save_pretrained layout)")
        return Checkpoint(spec, path)
    repo, revision = split_hf(spec)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as error:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise InputError(f"{where}: {spec} is not in the hub cache {constants.HF_HUB_CACHE}{offline} and could "
                         f"not be downloaded: {error}") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise InputError(f"{where}: {spec} could not be fetched from the hub: {error}") from None
    return Checkpoint(spec, folder, folder.name)


def read_config(checkpoint: Checkpoint, where: str = "pretrain.init"):
    """The checkpoint's config, after insisting that it is a BERT (post- or pre-LN) with safetensors weights."""
    raw = json.loads((checkpoint.path / "config.json").read_text(encoding="utf-8"))
    kind = raw.get("model_type")
    if kind not in architectures.MODEL_TYPES:
        classes = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise InputError(f"{where}: {checkpoint.spec} is a {kind or 'model without model_type'} checkpoint "
                         f"({classes}); supported: {SUPPORTED}")
    check_weights(checkpoint, where)
    config = architectures.config_class(architectures.MODEL_TYPES[kind]).from_pretrained(str(checkpoint.path))
    if config.type_vocab_size < 2:
        raise InputError(f"{where}: {checkpoint.spec} has type_vocab_size {config.type_vocab_size}; next-sentence "
                         "pairs need two segment types")
    return config


def check_weights(checkpoint: Checkpoint, where: str) -> None:
    """Safetensors only: pickled weights (``pytorch_model.bin``) can run code when loaded."""
    folder = checkpoint.path
    if list(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise InputError(
            f"{where}: {checkpoint.spec} has only pickled weights ({', '.join(pickled)}), which bertflow does not "
            "load; convert them once, on a machine you trust, with `python -c \"from transformers import AutoModel; "
            f"AutoModel.from_pretrained('{folder}').save_pretrained('<new folder>')\"` (writes model.safetensors) "
            "and point pretrain.init there")
    raise InputError(f"{where}: {checkpoint.spec} has no weights (no *.safetensors file in {folder})")


def check_sizes(config, model_params, where: str = "pretrain.model") -> None:
    """``pretrain.model`` must not contradict the checkpoint's sizes; every key at fault is named."""
    wrong = [f"{key} is {getattr(model_params, key)} but the checkpoint has {getattr(config, key)}"
             for key in ARCHITECTURE_KEYS if getattr(model_params, key) != getattr(config, key)]
    if wrong:
        raise InputError(f"{where} contradicts the checkpoint of pretrain.init: {'; '.join(wrong)}. Write the "
                         "checkpoint's sizes there (a checkpoint's shape cannot change)")


def starting_config(checkpoint: Checkpoint, model_params, architecture: str = "bert"):
    """The checkpoint's config with pretrain.model's dropout rates and the MLM decoder tied to the
    word embeddings (BERT's own arrangement), checked against pretrain.model and pretrain.architecture."""
    config = read_config(checkpoint)
    found = architectures.MODEL_TYPES[config.model_type]
    if found != architecture:
        raise InputError(f"pretrain.architecture is {architecture} but the checkpoint of pretrain.init is "
                         f"{found}; write {found} there (a checkpoint's architecture cannot change)")
    check_sizes(config, model_params)
    config.update({"hidden_dropout_prob": model_params.hidden_dropout_prob,
                   "attention_probs_dropout_prob": model_params.attention_probs_dropout_prob,
                   "tie_word_embeddings": True,
                   "architectures": [architectures.pretraining_class(found).__name__]})
    return config


def new_heads(missing: list[str]) -> list[str]:
    """The parts of BertForPreTraining a checkpoint lacked (from from_pretrained's missing keys); a
    missing encoder or embedding weight means a broken checkpoint, not a head to initialise."""
    found, broken = set(), []
    for key in missing:
        head = next((name for prefix, name in HEADS.items() if key.startswith(prefix)), None)
        if head:
            found.add(head)
        else:
            broken.append(key)
    if broken:
        raise InputError(f"pretrain.init: the checkpoint lacks encoder weights ({', '.join(broken[:5])}"
                         f"{', ...' if len(broken) > 5 else ''}); it is not a complete BERT")
    return sorted(found)


def load_pretraining_model(checkpoint: Checkpoint, config, seed: int, attention: str = "sdpa"):
    """(its ...ForPreTraining model, heads that were new) from the checkpoint; new heads get BERT's initialisation
    from ``seed``, so two runs start from the same weights."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the heads it lacks are reported in reports/pretrain.json instead
    try:
        model, info = architectures.pretraining_class(architectures.MODEL_TYPES[config.model_type]).from_pretrained(
            str(checkpoint.path), config=config, use_safetensors=True, local_files_only=True,
            output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    architectures.set_attention(model, attention)
    model.tie_weights()
    return model, new_heads(list(info.get("missing_keys", [])))


def load_checkpoint_tokenizer(checkpoint: Checkpoint, where: str = "pretrain.init"):
    """The checkpoint's own (fast) BERT tokenizer, with its lower-casing and accent rules, and without the
    padding or truncation its tokenizer.json may switch on (sentence-transformers saves both at 128 or 256:
    every sentence the data stages encode would be cut there and filled with [PAD])."""
    from transformers import AutoTokenizer

    if not (checkpoint.path / "tokenizer_config.json").is_file() and not (checkpoint.path / "vocab.txt").is_file():
        raise InputError(f"{where}: {checkpoint.spec} has no tokenizer (no tokenizer_config.json or vocab.txt)")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.path))
    if not tokenizer.is_fast:
        raise InputError(f"{where}: {checkpoint.spec}'s tokenizer has no fast (tokenizers) form")
    absent = [name for name in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
              if getattr(tokenizer, name) is None]
    if absent:
        raise InputError(f"{where}: {checkpoint.spec}'s tokenizer lacks BERT's {', '.join(absent)}")
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    return tokenizer
