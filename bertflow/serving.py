"""The registered classifier and its faster variants as one MLflow pyfunc model (MLflow "models from code").

This file is copied into every logged model and executed there, so it imports nothing from
bertflow: a consumer needs mlflow and the tokenizers library, plus torch and transformers for the
PyTorch variants or onnxruntime for the ONNX ones (never both). It reads the artifact
``classifier``: a folder with ``tokenizer.json``, ``config.json`` (label names in ``id2label``,
``max_position_embeddings``, ``pad_token_id``) and the weights its ``variant.json`` names:

- no ``variant.json``: a ``save_pretrained`` folder (the fp32 champion, the student, the pruned model);
- ``runtime: torch_int8``: a state dict of the dynamically quantized model (int8 linear layers);
- ``runtime: onnxruntime``: an ONNX graph (fp32 or int8), run with ONNX Runtime.

Whatever the variant, ``predict`` answers a list, Series, array or one-column DataFrame of texts
with a DataFrame: ``label`` and one ``score_<label>`` column per class (softmax probabilities),
computed as ``bertflow evaluate`` computes them: truncation at ``max_position_embeddings``,
length-sorted batches of 128, softmax of the logits. ``bertflow optimize`` measures every variant
through ``open_model`` and ``score`` below, i.e. through exactly what a consumer runs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

BATCH_SIZE = 128
VARIANT_FILE = "variant.json"


def as_texts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise ValueError(f"expected one column of texts, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    return [str(text) for text in list(model_input)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- runtimes: token ids in, logits out


class TorchRuntime:
    """A transformers BertForSequenceClassification (fp32, or int8 after dynamic quantization)."""

    def __init__(self, folder: Path, variant: dict, threads: int | None):
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        if variant.get("runtime") == "torch_int8":
            model = BertForSequenceClassification(BertConfig.from_pretrained(str(folder))).eval()
            model = quantize_int8(model)
            model.load_state_dict(torch.load(folder / variant["weights"], weights_only=True))
        else:
            model = BertForSequenceClassification.from_pretrained(str(folder)).eval()
        self.model = model

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids)
            out = self.model(input_ids=ids, attention_mask=torch.from_numpy(attention_mask),
                             token_type_ids=torch.zeros_like(ids)).logits
        return out.float().numpy()


def quantize_int8(model):
    """PyTorch dynamic quantization: every nn.Linear's weights to int8, activations quantized per batch."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization moves to torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class OnnxRuntime:
    """An ONNX graph with inputs input_ids, attention_mask, token_type_ids (int64) and output logits."""

    def __init__(self, folder: Path, variant: dict, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the CPU
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / variant["weights"]), options,
                                            providers=["CPUExecutionProvider"])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": np.zeros_like(input_ids)}
        return self.session.run(["logits"], feed)[0].astype(np.float32)


# ---------------------------------------------------------------- a model: tokenizer + runtime + labels


class LoadedModel:
    def __init__(self, folder: str | Path, threads: int | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        variant_file = folder / VARIANT_FILE
        self.variant = json.loads(variant_file.read_text(encoding="utf-8")) if variant_file.is_file() else {
            "name": "fp32", "runtime": "torch"}
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        self.max_length = config["max_position_embeddings"]
        self.pad_id = config.get("pad_token_id") or 0
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        runtime = OnnxRuntime if self.variant["runtime"] == "onnxruntime" else TorchRuntime
        self.runtime = runtime(folder, self.variant, threads)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def score(self, texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Softmax probabilities, one row per text, computed in length-sorted padded batches."""
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            out[rows] = softmax(self.runtime.logits(input_ids, mask).astype(np.float64))
        return out

    def frame(self, texts: list[str]) -> pd.DataFrame:
        scores = self.score(texts)
        labels = pd.Series([self.labels[i] for i in scores.argmax(1)], dtype=object if len(texts) else str)
        return pd.DataFrame({"label": labels, **{f"score_{name}": scores[:, i] for i, name in enumerate(self.labels)}})


def open_model(folder: str | Path, threads: int | None = None) -> LoadedModel:
    return LoadedModel(folder, threads)


warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # the signature is explicit


class BertClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = open_model(context.artifacts["classifier"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return self.model.frame(as_texts(model_input))


mlflow.models.set_model(BertClassifier())
