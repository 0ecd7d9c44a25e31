"""Pretraining throughput: bertflow's pretrain step against the reference loop, with the machine's matmul peak.

Reference: transformers' ``BertForPreTraining`` with its own loss (MLM logits over the full
vocabulary at every position), fp32, a plain PyTorch loop over shuffled batches (dynamic padding).
bertflow: ``tasks.pretrain``'s step — MLM head at the masked positions only, bf16 autocast where the
CPU has it, batches built by length. Same model config, same optimizer (AdamW), same examples
(the default profile's ``data/pretrain`` shards with its dynamic masking), same batch size, one
process, the two sides interleaved in rounds so machine noise hits both alike.

Figures: non-padding tokens/s and sequences/s in steady state (after warm-up steps), and model FLOPs
utilisation against the measured bf16 and fp32 matmul peaks. Model FLOPs per token (the same
count for both sides, i.e. the useful work): 6·N_encoder + 12·L·T·H (attention) + 6·H·V·m, with
N_encoder the non-embedding parameters, T the mean padded length, m the masked fraction.
With vocabulary 30522 the token ids are the project's (all below 16384): the compute is that of a
30522-word model.

Reads: ``data/pretrain`` and ``artifacts/tokenizer`` (run ``make run`` or ``dvc repro pretrain_data``).
Writes: ``benchmarks/results/pretraining.{json,md}``.

    python benchmarks/pretraining.py [--steps 6] [--warmup 2] [--rounds 2] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import training as tr  # noqa: E402
from tasks.model import pretraining_loss  # noqa: E402
from tasks.paths import Paths  # noqa: E402

CONFIGS = {"BERT-Tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
           "BERT-Mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)}


def matmul_peak(dtype: torch.dtype) -> float:
    """Best GFLOP/s of square matrix products (n = 512, 1024, 2048)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        reps = max(3, int(2e10 / (2 * n ** 3)))
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - started) / 1e9)
    return best


def build_model(name: str, vocab: int, seed: int):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **CONFIGS[name])
    return BertForPreTraining(config)


class Side:
    """One side of the comparison: a model, an optimizer, a batch order and a step function."""

    def __init__(self, name, model, order, batches, batch_size, fast: bool, bf16: bool):
        self.name, self.model, self.fast, self.bf16 = name, model, fast, bf16
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.order, self.batches, self.batch_size, self.cursor = order, batches, batch_size, 0
        self.tokens = self.sequences = self.padded = self.masked = 0
        self.seconds = 0.0

    def next_batch(self) -> dict:
        if self.cursor + self.batch_size > len(self.order):
            self.cursor = 0
        indices = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.batches.batch(indices, mask_seed=f"bench/{indices[0]}")

    def step(self, measure: bool) -> None:
        batch = self.next_batch()
        started = time.perf_counter()
        if self.fast:
            with tr.autocast(self.bf16):
                loss = pretraining_loss(self.model, batch).loss
        else:
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if measure:
            self.seconds += elapsed
            self.tokens += int(batch["attention_mask"].sum())
            self.padded += batch["input_ids"].numel()
            self.masked += int((batch["labels"] != -100).sum())
            self.sequences += batch["input_ids"].shape[0]


def model_flops_per_token(model, mean_length: float, masked_fraction: float) -> float:
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    decoder = config.vocab_size * config.hidden_size  # tied with the word embeddings; counted below
    encoder = sum(p.numel() for p in model.parameters()) - embedding - config.vocab_size  # minus decoder bias
    return (6 * encoder + 12 * config.num_hidden_layers * mean_length * config.hidden_size
            + 6 * decoder * masked_fraction)


def measure(name: str, vocab: int, batches, args, peaks: dict) -> dict:
    shuffled = list(range(len(batches)))
    random.Random(0).shuffle(shuffled)
    bucketed = batches.order(0, args.batch_size)
    bf16 = tr.cpu_supports_bf16()
    sides = [Side("reference", build_model(name, vocab, 0), shuffled, batches, args.batch_size, False, False),
             Side("bertflow", build_model(name, vocab, 0), bucketed, batches, args.batch_size, True, bf16)]
    for side in sides:
        for _ in range(args.warmup):
            side.step(measure=False)
    for _ in range(args.rounds):  # interleaved: reference, bertflow, reference, bertflow, ...
        for side in sides:
            for _ in range(args.steps):
                side.step(measure=True)
    row = {"config": name, "vocab_size": vocab, "batch_size": args.batch_size, "bf16": bf16}
    for side in sides:
        mean_length = side.padded / side.sequences
        flops = model_flops_per_token(side.model, mean_length, side.masked / side.tokens) * side.tokens
        row[side.name] = {
            "tokens_per_second": round(side.tokens / side.seconds),
            "sequences_per_second": round(side.sequences / side.seconds, 2),
            "padding_fraction": round(1 - side.tokens / side.padded, 3),
            "model_gflops_per_second": round(flops / side.seconds / 1e9, 1),
            "mfu_vs_bf16_peak": round(flops / side.seconds / 1e9 / peaks["bf16"], 3),
            "mfu_vs_fp32_peak": round(flops / side.seconds / 1e9 / peaks["fp32"], 3),
        }
    row["speedup"] = round(row["bertflow"]["tokens_per_second"] / row["reference"]["tokens_per_second"], 2)
    print(json.dumps(row), flush=True)
    return row


def markdown(result: dict) -> str:
    head = f"# Pretraining throughput ({result['machine']}, {result['threads']} threads, torch {result['torch']})"
    lines = [head, "",
             f"matmul peak: fp32 {result['peaks']['fp32']:.0f} GFLOP/s, bf16 {result['peaks']['bf16']:.0f} GFLOP/s "
             f"(measured in the same run). Tokens = non-padding tokens.", "",
             "| config | vocab | reference tokens/s | bertflow tokens/s | speed-up | reference MFU (fp32 peak) | "
             "bertflow MFU (bf16 peak) | bertflow padding |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['vocab_size']} | {r['reference']['tokens_per_second']:,} | "
                     f"{r['bertflow']['tokens_per_second']:,} | {r['speedup']}× | "
                     f"{r['reference']['mfu_vs_fp32_peak']:.1%} | {r['bertflow']['mfu_vs_bf16_peak']:.1%} | "
                     f"{r['bertflow']['padding_fraction']:.1%} (reference {r['reference']['padding_fraction']:.1%}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="measured steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = tr.set_threads(args.threads)
    from tasks.io import read_json
    from tasks.params import PretrainDataParams
    from tasks.pretrain import PretrainBatches, read_shards
    from tasks.pretrain_data import masking_spec
    from tasks.tokenizer import load_tokenizer

    paths = Paths(REPO)
    tokenizer = load_tokenizer(paths.tokenizer)
    info = read_json(paths.pretrain_data / "info.json")
    spec = masking_spec(tokenizer, PretrainDataParams(**info["params"]))
    batches = PretrainBatches(read_shards(paths.pretrain_data / "train"), tokenizer.pad_token_id, spec, seed=0)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(json.dumps({"peaks": peaks}), flush=True)
    rows = [measure(name, vocab, batches, args, peaks) for name in CONFIGS for vocab in (30522, len(tokenizer))]
    result = {"machine": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
              "peaks": {k: round(v, 1) for k, v in peaks.items()}, "args": vars(args), "rows": rows}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretraining.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pretraining.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
