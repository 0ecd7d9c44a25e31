"""The registered classifier as an MLflow pyfunc model (MLflow "models from code").

This file is copied into the logged model and executed there, so it imports nothing from bertflow:
a consumer needs only mlflow, torch and transformers. It reads the artifact ``classifier`` (a
``save_pretrained`` folder with its tokenizer, label names in ``config.id2label``) and answers a
list, Series, array or one-column DataFrame of texts with a DataFrame: ``label`` and one
``score_<label>`` column per class (softmax probabilities).

It computes exactly what ``bertflow evaluate`` computes: fp32, truncation at the model's
``max_position_embeddings``, length-sorted batches of 128, softmax of the logits.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
import pandas as pd
import torch

BATCH_SIZE = 128


def as_texts(model_input) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise ValueError(f"expected one column of texts, got columns {list(model_input.columns)}")
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        model_input = [model_input]
    texts = [str(text) for text in list(model_input)]
    return texts


warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")  # the signature is explicit


class BertClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoTokenizer, BertForSequenceClassification

        folder = context.artifacts["classifier"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = BertForSequenceClassification.from_pretrained(folder).eval()
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self.max_length = config.max_position_embeddings

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        texts = as_texts(model_input)
        scores = self.scores(texts).astype(np.float64)
        labels = pd.Series([self.labels[i] for i in scores.argmax(1)], dtype=object if len(texts) else str)
        return pd.DataFrame({"label": labels, **{f"score_{name}": scores[:, i] for i, name in enumerate(self.labels)}})

    @torch.inference_mode()
    def scores(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), BATCH_SIZE):
            rows = order[start:start + BATCH_SIZE]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            logits = self.model(input_ids=input_ids, attention_mask=mask,
                                token_type_ids=torch.zeros_like(input_ids)).logits
            out[rows] = torch.softmax(logits.float(), dim=-1).numpy()
        return out


mlflow.models.set_model(BertClassifier())
