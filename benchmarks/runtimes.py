"""Inference runtimes head to head: ONNX Runtime's transformer fusions (fused vs unfused graph, fp32 and int8)
and torchao's int8 dynamic quantization vs torch.ao's, on the same models and the same token ids.

Models: the fine-tuned ``artifacts/classifier`` when there is one, else random-weight classifiers shaped as
params.yaml's ``pretrain.model`` (BERT-Mini) and params.tiny.yaml's, each also as MegatronBert (pre-LayerNorm)
with ``--megatron``. Inputs: random token ids, 64 rows of 8 to 48 tokens (SST-2's range) with padding.
Timed: the runtime alone (no tokenizer), batch-1 latency (p50) and rows/s at batch 32, in interleaved rounds
(each round times every side in turn, starting one further along). Equal outputs: the largest |Δ probability|
over the rows between the two sides of a pair. Decides ``optimize.onnx_fusion: auto`` (see README).

torchao is optional (``pip install torchao==0.18.0 --no-deps``, never another torch); without it its side is
left out.

Reads: params.yaml, params.tiny.yaml (and artifacts/classifier if present). Writes:
``benchmarks/results/runtimes.{json,md}``.

    python benchmarks/runtimes.py [--rounds 5] [--threads 2] [--megatron] [--skip-torchao]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, machine_line, write_results  # noqa: E402
from bertflow import compress  # noqa: E402
from bertflow import training as tr  # noqa: E402
from bertflow.params import load_params  # noqa: E402
from bertflow.serving import OnnxRuntime, quantize_int8, softmax  # noqa: E402

ROWS, BATCH = 64, 32


def random_classifier(shape: dict, megatron: bool, vocab_size: int = 30522):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("megatron-bert" if megatron else "bert", vocab_size=vocab_size, num_labels=2,
                                  **shape)
    return AutoModelForSequenceClassification.from_config(config).eval()


def token_batches(vocab_size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """ROWS random texts of 8..48 tokens as (ids, mask) batches of BATCH, padded to the longest row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 49, ROWS)
    out = []
    for start in range(0, ROWS, BATCH):
        rows = lengths[start:start + BATCH]
        ids = np.zeros((len(rows), rows.max()), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, n in enumerate(rows):
            ids[r, :n] = rng.integers(5, vocab_size, n)
            mask[r, :n] = 1
        out.append((ids, mask))
    return out


class TorchSide:
    def __init__(self, model):
        import torch

        self.torch, self.model = torch, model

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.from_numpy(ids), attention_mask=self.torch.from_numpy(mask),
                              token_type_ids=self.torch.zeros_like(self.torch.from_numpy(ids))).logits.float().numpy()


def time_sides(sides: dict, batches: list, rounds: int) -> dict[str, dict]:
    """p50 ms of one row (batch 1, each row of the first batch alone) and rows/s at batch 32, interleaved."""
    singles = [(ids[r:r + 1, : mask[r].sum()], mask[r:r + 1, : mask[r].sum()]) for ids, mask in batches[:1]
               for r in range(min(len(ids), 16))]
    latencies = {name: [] for name in sides}
    passes = {name: [] for name in sides}
    for side in sides.values():  # warm-up: first runs allocate and plan
        side.logits(*singles[0])
        side.logits(*batches[0])
    names = list(sides)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            for ids, mask in singles:
                started = time.perf_counter()
                sides[name].logits(ids, mask)
                latencies[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            for ids, mask in batches:
                sides[name].logits(ids, mask)
            passes[name].append(time.perf_counter() - started)
    return {name: {"p50_ms_b1": round(1000 * statistics.median(latencies[name]), 3),
                   "rows_per_s_b32": round(ROWS / statistics.median(passes[name]), 1)} for name in sides}


def max_difference(a, b, batches: list) -> float:
    return float(max(np.abs(softmax(a.logits(*batch)) - softmax(b.logits(*batch))).max() for batch in batches))


def onnx_pairs(model, folder: Path, threads: int) -> tuple[dict, dict]:
    """The unfused and fused graphs, fp32 and int8, as served (bertflow.serving.OnnxRuntime)."""
    source = folder / "source"
    for name in ("source", "onnx", "fused_int8", "unfused_int8"):
        (folder / name).mkdir()
    model.config.save_pretrained(str(source))
    compress.onnx_variant(model, source, folder / "onnx", 17)
    fired = compress.fuse_onnx(folder / "onnx" / "model.onnx", folder / "onnx" / "model.fused.onnx", model.config)
    compress.onnx_int8_variant(folder / "onnx", folder / "unfused_int8")
    compress.onnx_int8_variant(folder / "onnx", folder / "fused_int8", "model.fused.onnx")
    sides = {"onnx": OnnxRuntime(folder / "onnx", {"weights": "model.onnx"}, threads),
             "onnx fused": OnnxRuntime(folder / "onnx", {"weights": "model.fused.onnx"}, threads),
             "onnx_int8": OnnxRuntime(folder / "unfused_int8", {"weights": "model.onnx"}, threads),
             "onnx_int8 fused": OnnxRuntime(folder / "fused_int8", {"weights": "model.onnx"}, threads)}
    return sides, fired


def torchao_int8(model):
    """torchao's successor of torch.ao's dynamic quantization: int8 activations (per token) and weights."""
    import torchao.quantization as ao

    quantized = copy.deepcopy(model)
    ao.quantize_(quantized, ao.Int8DynamicActivationInt8WeightConfig())
    return quantized


def measure_model(label: str, model, rounds: int, threads: int, skip_torchao: bool) -> dict:
    batches = token_batches(model.config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="bertflow-runtimes-") as scratch:
        sides, fired = onnx_pairs(model, Path(scratch), threads)
        sides["torch fp32"] = TorchSide(model)
        sides["torch.ao int8"] = TorchSide(quantize_int8(copy.deepcopy(model)))
        if not skip_torchao:
            sides["torchao int8"] = TorchSide(torchao_int8(model))
        figures = time_sides(sides, batches, rounds)
        pairs = [("onnx", "onnx fused"), ("onnx_int8", "onnx_int8 fused"), ("torch fp32", "onnx"),
                 ("torch fp32", "torch.ao int8")] + ([] if skip_torchao else [("torch fp32", "torchao int8")])
        differences = {f"{a} | {b}": round(max_difference(sides[a], sides[b], batches), 7) for a, b in pairs}
    return {"model": label, "fused_operators": fired, "sides": figures, "max_abs_probability_difference": differences}


def markdown(result: dict) -> str:
    lines = [f"# Inference runtimes ({machine_line(result['machine'])})", "",
             f"Random token ids, {ROWS} rows of 8-48 tokens; the runtime alone (no tokenizer); {result['rounds']} "
             f"interleaved rounds; {result['threads']} threads. Ratios: × the row's pair (unfused ONNX, or torch "
             "fp32 for the int8 sides).", ""]
    for entry in result["models"]:
        sides = entry["sides"]
        lines += [f"## {entry['model']}", "", f"Fusions that fired: {entry['fused_operators'] or 'none'}", "",
                  "| side | p50 ms, batch 1 | rows/s, batch 32 | × pair, batch 1 | × pair, batch 32 |",
                  "|---|---|---|---|---|"]
        pair_of = {"onnx fused": "onnx", "onnx_int8 fused": "onnx_int8", "torch.ao int8": "torch fp32",
                   "torchao int8": "torch fp32", "onnx": "torch fp32"}
        for name, row in sides.items():
            pair = sides.get(pair_of.get(name, ""))
            ratio = " | " if not pair else (f"{pair['p50_ms_b1'] / row['p50_ms_b1']:.2f}× | "
                                            f"{row['rows_per_s_b32'] / pair['rows_per_s_b32']:.2f}×")
            lines.append(f"| {name} | {row['p50_ms_b1']} | {row['rows_per_s_b32']} | {ratio} |")
        lines += ["", "max |Δ probability|: " + "; ".join(f"{k}: {v:.1e}" for k, v in
                                                         entry["max_abs_probability_difference"].items()), ""]
    return "\n".join(lines)


def models(megatron: bool) -> list[tuple[str, object]]:
    classifier = REPO / "artifacts" / "classifier"
    found = []
    if (classifier / "config.json").is_file():
        from bertflow.model import load_classifier

        found.append(("artifacts/classifier", load_classifier(classifier).eval()))
    else:
        mini = load_params(REPO / "params.yaml").pretrain.model.model_dump()
        found.append(("BERT-Mini shape, random weights", random_classifier(mini, False)))
    tiny = load_params(REPO / "params.tiny.yaml").pretrain.model.model_dump()
    found.append(("tiny profile shape, random weights", random_classifier(tiny, False, 1000)))
    if megatron:
        found.append(("tiny profile shape, MegatronBert, random weights", random_classifier(tiny, True, 1000)))
    return found


def has_torchao() -> bool:
    try:
        import torchao.quantization  # noqa: F401 - optional: `pip install torchao --no-deps` to compare
    except ImportError:
        print("torchao is not installed: its int8 side is left out", flush=True)
        return False
    return True


def run(rounds: int = 5, threads: int = 2, megatron: bool = False, skip_torchao: bool = False) -> dict:
    threads = tr.set_threads(threads)
    skip_torchao = skip_torchao or not has_torchao()
    entries = [measure_model(label, model, rounds, threads, skip_torchao) for label, model in models(megatron)]
    result = {"machine": machine(), "rounds": rounds, "threads": threads, "models": entries}
    write_results("runtimes", result, markdown(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--megatron", action="store_true", help="also a MegatronBert (pre-LayerNorm) classifier")
    parser.add_argument("--skip-torchao", action="store_true")
    args = parser.parse_args()
    run(args.rounds, args.threads, args.megatron, args.skip_torchao)


if __name__ == "__main__":
    main()
