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
(or one with a ``text`` column) with a DataFrame: ``label``, one ``score_<label>`` column per class
(softmax probabilities) and ``truncated``, computed as ``bertflow evaluate`` computes them:
truncation at ``max_position_embeddings`` (``truncated`` says where it cut), length-sorted batches
of 128, softmax of the logits. Calls that arrive while the model runs (MLflow's scoring server calls
``predict`` from a thread per request) wait and share its next run (``Coalescer``). An item that is
not a non-blank string (a number, a null, a nested list, an empty or whitespace-only text) refuses
the whole request with an error naming the item, which MLflow's scoring server answers with HTTP 400.
``bertflow optimize`` measures every variant through ``open_model`` and ``score`` below, i.e. through
exactly what a consumer runs.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

BATCH_SIZE = 128
VARIANT_FILE = "variant.json"


TEXT_COLUMN = "text"
THREADS_VARIABLE = "BERTFLOW_THREADS"  # threads per model (torch or ONNX Runtime); unset: the runtime's default


class BadInput(ValueError):
    """A request that is not a list of texts; its message names the item or the column at fault."""


def as_texts(model_input) -> list[str]:
    """The texts of a request: a string, a list, array or Series of strings, or a DataFrame with one column
    (or a ``text`` column). Anything else is refused by naming the item: a number, a null, a nested list,
    an empty or whitespace-only text (there is nothing to classify in it)."""
    if isinstance(model_input, pd.DataFrame):
        model_input = text_column(model_input)
    if isinstance(model_input, str | bytes):
        model_input = [model_input]
    if isinstance(model_input, dict):
        raise BadInput(f"expected a list of texts, got an object with keys {sorted(map(str, model_input))}")
    if isinstance(model_input, np.ndarray) and model_input.ndim == 0:  # {"inputs": "one text"}
        model_input = [model_input.item()]
    if isinstance(model_input, np.ndarray) and model_input.ndim > 1:
        raise BadInput(f"expected a flat list of texts, got nested lists (shape {list(model_input.shape)})")
    items = list(model_input)
    for index, item in enumerate(items):
        check_text(index, item)
    return items


def text_column(frame: pd.DataFrame):
    if TEXT_COLUMN in frame.columns:
        return frame[TEXT_COLUMN]
    if frame.shape[1] != 1:
        raise BadInput(f"expected one column of texts or a column named {TEXT_COLUMN!r}, got columns "
                       f"{[str(c) for c in frame.columns]}")
    return frame.iloc[:, 0]


def check_text(index: int, item) -> None:
    if isinstance(item, list | tuple | np.ndarray | dict):
        raise BadInput(f"item {index} is a nested {type(item).__name__}, not a text")
    if not isinstance(item, str):
        kind = "null" if item is None or (isinstance(item, float) and np.isnan(item)) else type(item).__name__
        raise BadInput(f"item {index} is {kind}, not a text" + (f": {str(item)[:60]!r}" if kind != "null" else ""))
    if not item.strip():
        raise BadInput(f"item {index} is {'empty' if not item else 'whitespace only'}: there is nothing to classify")


def refused(error: BadInput):
    """The error MLflow's scoring server turns into HTTP 400 with this message (any other is a 500 or a
    generic 400 that names nothing)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(f"bad request: {error}", error_code=INVALID_PARAMETER_VALUE)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- runtimes: token ids in, logits out


class TorchRuntime:
    """A transformers sequence classifier, BERT or MegatronBert by its config (fp32, or int8 after dynamic
    quantization)."""

    def __init__(self, folder: Path, variant: dict, threads: int | None):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        if variant.get("runtime") == "torch_int8":
            config = AutoConfig.from_pretrained(str(folder))
            model = quantize_int8(AutoModelForSequenceClassification.from_config(config).eval())
            model.load_state_dict(torch.load(folder / variant["weights"], weights_only=True))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
        self.model = model

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            ids = torch.from_numpy(input_ids)
            if attention_mask.all():  # no padding (always so for one text): no mask to build and apply
                out = self.model(input_ids=ids).logits  # token types default to 0
            else:
                out = self.model(input_ids=ids, attention_mask=torch.from_numpy(attention_mask),
                                 token_type_ids=torch.zeros_like(ids)).logits
        return out.float().numpy()


def quantize_int8(model):
    """PyTorch dynamic quantization: every nn.Linear's weights to int8, activations quantized per batch.

    torch.ao.quantization is deprecated in favour of torchao's ``quantize_``; torchao 0.18.0's
    ``Int8DynamicActivationInt8WeightConfig`` imports, runs and round-trips through ``torch.save``/``torch.load``
    (weights_only; not safetensors: "Attempted to access the data pointer on an invalid python storage") on
    torch 2.13+cpu, but measured slower than this in eager mode (benchmarks/runtimes.py, BERT-Mini shape,
    2 threads, busy machine: p50 batch 1 8.2 vs 2.6 ms, batch 32 750 vs 1,150 rows/s), and it would add a dependency
    to every consumer. So torch.ao stays while this torch has it (README, "the optimize stage")."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization moves to torchao (see above)
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
        self.label_array = np.array(self.labels, dtype=object)
        self.max_length = config["max_position_embeddings"]
        self.pad_id = config.get("pad_token_id") or 0
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        runtime = OnnxRuntime if self.variant["runtime"] == "onnxruntime" else TorchRuntime
        self.runtime = runtime(folder, self.variant, threads)

    def encodings(self, texts: list[str]) -> list:
        """One text is encoded on the calling thread: ``encode_batch`` hands even one text to its thread pool."""
        return [self.tokenizer.encode(texts[0])] if len(texts) == 1 else self.tokenizer.encode_batch(texts)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.encodings(texts)]

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Word-piece ids cut at the model's length, and whether each text was cut."""
        encodings = self.encodings(texts)
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def score(self, texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Softmax probabilities, one row per text, computed in length-sorted padded batches."""
        return self.score_ids(self.token_ids(texts), batch_size)

    def score_ids(self, ids: list[list[int]], batch_size: int = BATCH_SIZE) -> np.ndarray:
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
        """``label``, ``score_<label>`` per class and ``truncated`` (the text was longer than the model)."""
        ids, truncated = self.encode(texts)
        scores = self.score_ids(ids)
        labels = pd.Series(self.label_array[scores.argmax(1)], dtype=object if len(texts) else str)
        columns = {"label": labels, **{f"score_{name}": scores[:, i] for i, name in enumerate(self.labels)},
                   "truncated": np.array(truncated, dtype=bool)}
        return pd.DataFrame(columns)  # columns of arrays: a third of the time Series of lists take at one text


def open_model(folder: str | Path, threads: int | None = None) -> LoadedModel:
    return LoadedModel(folder, threads)


COALESCED_TEXTS = 32  # a run takes waiting requests up to this many texts: at 32 a text costs half to two
# thirds of what it costs alone (benchmarks/results/serving.md); a bigger run only keeps its requests waiting


class Request:
    def __init__(self, texts: list[str]):
        self.texts, self.frame, self.error, self.done = texts, None, None, False


class Coalescer:
    """Calls that arrive while the model runs wait, then share its next run. MLflow's scoring server calls
    ``predict`` from a thread per request; one pass over n texts costs a CPU far less than n passes over one,
    and one pass at a time keeps concurrent requests from dividing the cores between them. A lone call
    runs at once, as if there were no coalescer."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.waiting_lock, self.running_lock = threading.Lock(), threading.Lock()
        self.waiting: list[Request] = []

    def frame(self, texts: list[str]) -> pd.DataFrame:
        request = Request(texts)
        with self.waiting_lock:
            self.waiting.append(request)
        with self.running_lock:
            while not request.done:  # nobody took it along: run the oldest waiting, it among them in time
                self.run(self.take())
        if request.error is not None:
            raise request.error
        return request.frame

    def take(self) -> list[Request]:
        """The oldest waiting requests, up to ``COALESCED_TEXTS`` texts (at least one request)."""
        with self.waiting_lock:
            end, texts = 0, 0
            while end < len(self.waiting) and (end == 0 or texts + len(self.waiting[end].texts) <= COALESCED_TEXTS):
                texts += len(self.waiting[end].texts)
                end += 1
            taken, self.waiting = self.waiting[:end], self.waiting[end:]
        return taken

    def run(self, requests: list[Request]) -> None:
        try:
            frame = self.model.frame([text for request in requests for text in request.texts])
        except Exception as error:  # noqa: BLE001 - every request of the run gets the error
            for request in requests:
                request.error, request.done = error, True
            return
        start = 0
        for request in requests:
            rows = frame if len(requests) == 1 else frame.iloc[start:start + len(request.texts)].reset_index(drop=True)
            request.frame, request.done = rows, True
            start += len(request.texts)


warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # the signature is explicit


class BertClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = open_model(context.artifacts["classifier"], int(os.environ.get(THREADS_VARIABLE) or 0) or None)
        self.coalescer = Coalescer(self.model)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        try:
            texts = as_texts(model_input)
        except BadInput as error:
            raise refused(error) from None
        return self.coalescer.frame(texts)


mlflow.models.set_model(BertClassifier())
