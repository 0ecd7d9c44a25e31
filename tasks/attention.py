"""Stage attention: where one chosen token looks, in every layer and head, before and after fine-tuning.

Reads: ``artifacts/pretrained`` and ``artifacts/classifier`` (their tokenizer and encoder).
Writes: ``reports/attention/`` — per configured sentence ``<n>_pretrained.png`` and
``<n>_classifier.png`` (heatmaps: one row per layer and head, one column per word piece, each row
the softmax weights from the chosen token to every token) and ``<n>_mean.png`` (the head-averaged
weights of each layer as bars, both models side by side) — and ``reports/attention.json`` with the
word pieces, the head-averaged weights and, per layer, the piece the chosen token attends to most
(every head's weights: ``reports/attention/<n>_weights.json``).
Run: ``bertflow attention``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bertflow import training as tr
from bertflow.io import InputError, atomic_dirs, write_json
from bertflow.params import AttentionParams, AttentionSentence
from bertflow.paths import Paths
from bertflow.tokenization import load_tokenizer

MODELS = {"pretrained": "pretrained encoder", "classifier": "fine-tuned classifier"}
SPECIAL = ("[CLS]", "[SEP]")

# ---------------------------------------------------------------- weights (pure given a model)


def encode(tokenizer, sentence: AttentionSentence) -> tuple[dict, list[str], int]:
    """(model inputs, word pieces, index of the chosen word's first piece); refuses a word not in the sentence."""
    encoded = tokenizer(sentence.text, return_tensors="pt", truncation=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    word_ids = encoded.word_ids(0)
    words = {}
    for index, word in enumerate(word_ids):
        if word is not None and word not in words:
            start, end = encoded.word_to_chars(0, word)
            words[word] = (sentence.text[start:end], index)
    for text, index in words.values():
        if text.lower() == sentence.token.lower():
            return dict(encoded), pieces, index
    raise InputError(f"attention.sentences: token {sentence.token!r} is not a word of {sentence.text!r} "
                     f"(its words: {', '.join(text for text, _ in words.values())})")


def load_encoder(folder: Path):
    """The BERT encoder (BertModel or MegatronBertModel, by its config) of a saved model (pretraining or
    classifier layout) with eager attention."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no model here (config.json missing); run the stage that builds it first")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the heads it leaves out (MLM, NSP, classifier) are expected
    try:
        model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def token_attention(model, inputs: dict, index: int) -> np.ndarray:
    """[layer, head, key]: the attention weights of the token at ``index`` (rows of softmax: sum to 1)."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    return torch.stack([layer[0, :, index, :] for layer in attentions]).float().numpy()


def strongest(weights: np.ndarray, pieces: list[str], index: int) -> list[str]:
    """Per layer, the piece with the largest head-averaged weight, leaving out itself and [CLS]/[SEP]."""
    mean = weights.mean(axis=1)
    allowed = [i for i, piece in enumerate(pieces) if i != index and piece not in SPECIAL]
    return [pieces[max(allowed, key=lambda i: layer[i])] for layer in mean]


# ---------------------------------------------------------------- drawing


def plot_heatmap(path: Path, weights: np.ndarray, pieces: list[str], index: int, title: str) -> None:
    import matplotlib.pyplot as plt

    layers, heads, _ = weights.shape
    rows = weights.reshape(layers * heads, -1)
    figure, axis = plt.subplots(figsize=(1.4 + 0.52 * len(pieces), 1.4 + 0.32 * len(rows)), dpi=110)
    image = axis.imshow(rows, cmap="viridis", vmin=0, vmax=max(float(rows.max()), 1e-6), aspect="auto")
    axis.set_xticks(range(len(pieces)), pieces, rotation=60, ha="right")
    axis.set_yticks(range(len(rows)), [f"L{layer + 1} H{head + 1}" for layer in range(layers) for head in range(heads)])
    axis.get_xticklabels()[index].set_fontweight("bold")
    for boundary in range(heads, len(rows), heads):
        axis.axhline(boundary - 0.5, color="white", linewidth=1.5)
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.03, pad=0.02)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def plot_means(path: Path, means: dict[str, np.ndarray], pieces: list[str], index: int, title: str) -> None:
    """One panel per layer: head-averaged weight to each piece, one bar per model."""
    import matplotlib.pyplot as plt

    layers = next(iter(means.values())).shape[0]
    figure, axes = plt.subplots(layers, 1, figsize=(1.4 + 0.52 * len(pieces), 1.1 + 1.6 * layers), dpi=110,
                                sharex=True, squeeze=False)
    width = 0.8 / len(means)
    top = 1.15 * max(float(mean.max()) for mean in means.values())
    positions = np.arange(len(pieces))
    for layer, axis in enumerate(axes[:, 0]):
        for offset, (name, mean) in enumerate(means.items()):
            axis.bar(positions + (offset - (len(means) - 1) / 2) * width, mean[layer], width, label=MODELS[name])
        axis.set_ylabel(f"layer {layer + 1}")
        axis.set_ylim(0, top)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    axes[0, 0].set_title(title, fontsize=10)
    axes[-1, 0].set_xticks(positions, pieces, rotation=60, ha="right")
    axes[-1, 0].get_xticklabels()[index].set_fontweight("bold")
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


# ---------------------------------------------------------------- edge


def sentence_view(folder: Path, number: int, sentence: AttentionSentence, encoders: dict) -> dict:
    """Weights of both models for one sentence; draws its three PNGs into ``folder``."""
    figures, means, weights_out = {"text": sentence.text, "token": sentence.token}, {}, {}
    for name, (model, tokenizer) in encoders.items():
        inputs, pieces, index = encode(tokenizer, sentence)
        weights = token_attention(model, inputs, index)
        means[name] = weights.mean(axis=1)
        label = f"{MODELS[name]}: attention from {pieces[index]!r} (row: layer L, head H)"
        plot_heatmap(folder / f"{number}_{name}.png", weights, pieces, index, label)
        figures.update(pieces=pieces, token_index=index)
        figures[name] = {"strongest_per_layer": strongest(weights, pieces, index),
                         "head_mean": np.round(means[name], 4).tolist()}
        weights_out[name] = np.round(weights, 5).tolist()
    plot_means(folder / f"{number}_mean.png", means, figures["pieces"], figures["token_index"],
               f"head-averaged attention from {figures['pieces'][figures['token_index']]!r}")
    write_json(folder / f"{number}_weights.json", {"pieces": figures["pieces"], **weights_out})
    return figures


def run(params: AttentionParams, paths: Paths) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    tr.set_threads(params.num_threads)
    encoders = {"pretrained": paths.pretrained, "classifier": paths.classifier}
    encoders = {name: (load_encoder(folder), load_tokenizer(folder)) for name, folder in encoders.items()}
    with atomic_dirs([paths.reports / "attention"]) as (folder,):
        views = [sentence_view(folder, number, sentence, encoders)
                 for number, sentence in enumerate(params.sentences, start=1)]
    return {"models": MODELS, "sentences": views}
