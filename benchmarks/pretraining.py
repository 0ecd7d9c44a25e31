"""Pretraining throughput: bertflow's pretrain step against transformers.Trainer and a plain reference loop,
with the machine's matmul peak.

transformers.Trainer (``benchmarks/trainer_side.py``): ``BertForPreTraining`` with its own loss, driven by
``Trainer.train()`` with every built-in speed option that applies on a CPU (bf16, fused AdamW,
torch.compile, length-grouped sampling, eager attention, in-process loading), on the same batches.

Reference: transformers' ``BertForPreTraining`` with its own loss (MLM logits over the full
vocabulary at every position), stock attention (SDPA), fp32, plain AdamW, a plain PyTorch loop
over shuffled batches (dynamic padding). bertflow: ``tasks.pretrain``'s step as the default profile
runs it — MLM head at the masked positions only, the compiled masked-LM loss, eager attention,
bf16 autocast where the CPU has it, fused AdamW, gradient clipping, batches built by length. Same
model config, same examples (the default profile's ``data/pretrain`` shards with its dynamic
masking), same batch size, one process; the sides run interleaved step by step (every other round
in reverse order) so machine noise hits them alike. For BERT-Mini/30522 the same rounds also run
bertflow's step with one technique taken away at a time (the ablation: what each one buys), and
four bertflow steps are profiled (top ops).

Figures: non-padding tokens/s and sequences/s in steady state (after warm-up steps), and model FLOPs
utilisation against the measured bf16 and fp32 matmul peaks. Model FLOPs per token (the same
count for both sides, i.e. the useful work): 6·N_encoder + 12·L·T·H (attention) + 6·H·V·m, with
N_encoder the non-embedding parameters, T the mean padded length, m the masked fraction.
With vocabulary 30522 the token ids are the project's (all below 16384): the compute is that of a
30522-word model.

Reads: ``data/pretrain`` and ``artifacts/tokenizer`` (run ``make run`` or ``dvc repro pretrain_data``).
Writes: ``benchmarks/results/pretraining.{json,md}``.

    python benchmarks/pretraining.py [--rounds 12] [--steps 1] [--warmup 2] [--batch-size 64] [--no-trainer]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    bert_linears,
    ensure_output,
    linear_shapes,
    machine,
    machine_line,
    matmul_peak,
    matmul_rate,
    thousands,
    throughput_figures,
    write_results,
)
from benchmarks.trainer_side import TrainerSide  # noqa: E402
from bertflow import training as tr  # noqa: E402
from bertflow.model import (  # noqa: E402
    compiled_masked_lm_loss,
    construct_pretraining_model,
    masked_lm_loss,
    pretraining_loss,
)
from bertflow.params import PretrainParams, load_params  # noqa: E402
from bertflow.paths import Paths  # noqa: E402

CONFIGS = {"BERT-Tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
           "BERT-Mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)}
ABLATED = ("BERT-Mini", 30522)


@dataclass(frozen=True)
class Recipe:
    """How one side computes a step."""

    sparse_head: bool  # MLM head at the masked positions only (else BertForPreTraining's own loss)
    compile_loss: bool
    attention: str
    bf16: bool
    fused_adamw: bool
    length_batches: bool
    clip: bool


REFERENCE = Recipe(sparse_head=False, compile_loss=False, attention="sdpa", bf16=False, fused_adamw=False,
                   length_batches=False, clip=False)


def profile() -> PretrainParams:
    """The default profile's pretrain section (params.yaml)."""
    return load_params(REPO / "params.yaml").pretrain


def bertflow_recipe() -> Recipe:
    """The pretrain stage as the default profile runs it, bf16 where the CPU has it."""
    params = profile()
    return Recipe(sparse_head=True, compile_loss=params.compile_loss, attention=params.attention,
                  bf16=tr.use_bf16(params.bf16), fused_adamw=True, length_batches=True, clip=True)


def ablations(bertflow: Recipe) -> dict[str, Recipe]:
    """bertflow's step with one technique taken away at a time."""
    return {"bertflow without the compiled loss": replace(bertflow, compile_loss=False),
            "bertflow with SDPA attention": replace(bertflow, attention="sdpa"),
            "bertflow without fused AdamW": replace(bertflow, fused_adamw=False),
            "bertflow without bf16": replace(bertflow, bf16=False),
            "bertflow without length batching": replace(bertflow, length_batches=False),
            "bertflow without the sparse MLM head": replace(bertflow, sparse_head=False, compile_loss=False)}


def build_model(name: str, vocab: int, attention: str, seed: int = 0):
    from transformers import BertConfig

    config = BertConfig(vocab_size=vocab, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **CONFIGS[name])
    return construct_pretraining_model(config, seed, attention)


def build_optimizer(model, recipe: Recipe):
    if recipe.fused_adamw:
        return tr.adamw(model, 1e-4, 0.01)
    return torch.optim.AdamW(tr.parameter_groups(model, 0.01), lr=1e-4)


class Side:
    """One side of the comparison: a recipe, its model and optimizer, a batch order, the figures so far."""

    def __init__(self, name: str, recipe: Recipe, config: str, vocab: int, batches, batch_size: int):
        self.name, self.recipe = name, recipe
        self.model = build_model(config, vocab, recipe.attention)
        self.optimizer = build_optimizer(self.model, recipe)
        self.mlm_loss = compiled_masked_lm_loss() if recipe.compile_loss else masked_lm_loss
        if recipe.length_batches:
            self.order = batches.order(0, batch_size)
        else:
            self.order = list(range(len(batches)))
            random.Random(0).shuffle(self.order)
        self.batches, self.batch_size, self.cursor = batches, batch_size, 0
        self.tokens = self.sequences = self.padded = self.masked = 0
        self.seconds = 0.0

    def next_batch(self) -> dict:
        if self.cursor + self.batch_size > len(self.order):
            self.cursor = 0
        indices = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.batches.batch(indices, mask_seed=f"bench/{indices[0]}")

    def compute(self, batch: dict) -> None:
        with tr.autocast(self.recipe.bf16):
            if self.recipe.sparse_head:
                loss = pretraining_loss(self.model, batch, self.mlm_loss).loss
            else:
                loss = self.model(**batch).loss
        loss.backward()
        if self.recipe.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, measure: bool) -> None:
        batch = self.next_batch()
        started = time.perf_counter()
        self.compute(batch)
        elapsed = time.perf_counter() - started
        if measure:
            self.seconds += elapsed
            self.tokens += int(batch["attention_mask"].sum())
            self.padded += batch["input_ids"].numel()
            self.masked += int((batch["labels"] != -100).sum())
            self.sequences += batch["input_ids"].shape[0]


def side_figures(side, peaks: dict) -> dict:
    """Throughput and MFU of a side (a ``Side`` or the ``TrainerSide``: model, tokens, padded, masked, sequences,
    seconds)."""
    flops = model_flops_per_token(side.model, side.padded / side.sequences, side.masked / side.tokens)
    return throughput_figures(side, flops, peaks)


def model_flops_per_token(model, mean_length: float, masked_fraction: float) -> float:
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    decoder = config.vocab_size * config.hidden_size  # tied with the word embeddings; counted below
    encoder = sum(p.numel() for p in model.parameters()) - embedding - config.vocab_size  # minus decoder bias
    return (6 * encoder + 12 * config.num_hidden_layers * mean_length * config.hidden_size
            + 6 * decoder * masked_fraction)


def measure(name: str, vocab: int, batches, args, peaks: dict) -> dict:
    bertflow = bertflow_recipe()
    recipes = {"reference": REFERENCE, "bertflow": bertflow}
    if (name, vocab) == ABLATED and not args.no_ablation:
        recipes.update(ablations(bertflow))
    sides = [Side(side, recipe, name, vocab, batches, args.batch_size) for side, recipe in recipes.items()]
    for side in sides:
        for _ in range(args.warmup):
            side.step(measure=False)
    measured = list(sides)
    if args.no_trainer:
        for round_ in range(args.rounds):
            run_round(sides, round_, args.steps)
    else:  # the Trainer's own loop drives the rounds; the other sides step inside it
        trainer = TrainerSide(build_model(name, vocab, "eager"), batches.lengths,
                              lambda indices: batches.batch(indices, mask_seed=f"bench/{indices[0]}"),
                              args.batch_size, 1e-4, bertflow.bf16, args.trainer_warmup)
        trainer.run(args.rounds, args.steps, lambda round_: run_round(sides, round_, args.steps))
        measured.append(trainer)
    row = {"config": name, "vocab_size": vocab, "batch_size": args.batch_size, "bf16": bertflow.bf16,
           **{side.name: side_figures(side, peaks) for side in measured}}
    row["speedup"] = round(row["bertflow"]["tokens_per_second"] / row["reference"]["tokens_per_second"], 2)
    if not args.no_trainer:
        row["vs_trainer"] = round(row["bertflow"]["tokens_per_second"] / row[TrainerSide.name]["tokens_per_second"], 2)
    if (name, vocab) == ABLATED:
        row["profile"], row["matmul_share"] = profile_step(sides[1], args.profile_ops)
        row["matmul_ceiling"] = matmul_ceiling(sides[1], args.batch_size, peaks)
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    return row


def run_round(sides: list[Side], round_: int, steps: int) -> None:
    """One interleaved round: every side's ``steps`` steps, in reverse order every other round (no side always
    goes first; with the Trainer, it goes last in even rounds and first in odd ones)."""
    for side in sides if round_ % 2 == 0 else sides[::-1]:
        for _ in range(steps):
            side.step(measure=True)


def matmul_ceiling(side: Side, batch_size: int, peaks: dict) -> dict:
    """What the side's matmuls reach at the model's own shapes (the encoder's linear layers over a batch's padded
    rows, the MLM head's over its masked rows), against the square-matrix peak: the MFU the step would have if
    nothing but its linear layers took time."""
    config = side.model.config
    rows = round(side.padded / side.sequences * batch_size)
    masked = round(side.masked / side.sequences * batch_size)
    head = [(config.hidden_size, config.hidden_size), (config.hidden_size, config.vocab_size)]
    shapes = linear_shapes(rows, bert_linears(config)) + linear_shapes(masked, head)
    peak = peaks["bf16" if side.recipe.bf16 else "fp32"]
    rate = matmul_rate(shapes, torch.bfloat16 if side.recipe.bf16 else torch.float32)
    return {"rows": rows, "masked_rows": masked, "gflops_per_second": round(rate, 1), "of_peak": round(rate / peak, 3)}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_step(side: Side, top: int, steps: int = 4) -> tuple[list[dict], float]:
    """The top ops (self CPU time) of ``steps`` bertflow steps (batches of every length), as shares, and the
    share of all matrix products."""
    from torch.profiler import ProfilerActivity, profile

    batches = [side.next_batch() for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            side.compute(batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    return ([{"op": op_name(e.key), "self_ms": round(e.self_cpu_time_total / 1e3, 1),
              "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]],
            round(matmul / total, 3))


def op_name(key: str) -> str:
    """Profiler keys, with inductor's graph hashes named for what they are (the compiled loss)."""
    return "compiled masked-LM loss (an inductor graph)" if key.startswith("## Call CompiledFxGraph") else key


def markdown(result: dict) -> str:
    peaks = result["peaks"]
    lines = [f"# Pretraining throughput ({machine_line(result['machine'])})", "",
             f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s (measured in the "
             f"same run). Batch {result['args']['batch_size']}, sequence ≤ 128; tokens = non-padding tokens; "
             f"steady state ({result['args']['rounds']} interleaved rounds × {result['args']['steps']} steps per side "
             f"after {result['args']['warmup']} warm-up steps).", "",
             "| config | vocab | reference tokens/s | Trainer tokens/s | bertflow tokens/s | vs reference | "
             "vs Trainer | bertflow sequences/s | MFU reference (fp32 peak) / Trainer / bertflow (bf16 peak) | "
             "padding bertflow (Trainer, reference) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ref, ours = r["reference"], r["bertflow"]
        trainer = r.get(TrainerSide.name, {})
        lines.append(f"| {r['config']} | {r['vocab_size']} | {ref['tokens_per_second']:,} | "
                     f"{thousands(trainer.get('tokens_per_second'))} | {ours['tokens_per_second']:,} | "
                     f"{r['speedup']}× | "
                     f"{r.get('vs_trainer', '–')}× | {ours['sequences_per_second']} | "
                     f"{ref['mfu_vs_fp32_peak']:.1%} / {trainer.get('mfu_vs_bf16_peak', float('nan')):.1%} / "
                     f"{ours['mfu_vs_bf16_peak']:.1%} | {ours['padding_fraction']:.1%} "
                     f"({trainer.get('padding_fraction', float('nan')):.1%}, {ref['padding_fraction']:.1%}) |")
    ablated = [r for r in result["rows"] if "profile" in r]
    for r in ablated:
        lines += ["", f"## What each technique buys ({r['config']}, vocabulary {r['vocab_size']}, same rounds)", "",
                  "| step | tokens/s | vs bertflow | MFU (bf16 peak) |", "|---|---|---|---|"]
        base = r["bertflow"]["tokens_per_second"]
        for name, side in r.items():
            if isinstance(side, dict) and "tokens_per_second" in side:
                lines.append(f"| {name} | {side['tokens_per_second']:,} | {side['tokens_per_second'] / base:.2f} | "
                             f"{side['mfu_vs_bf16_peak']:.1%} |")
        lines += ["", f"## Where a bertflow step's time goes ({r['config']}/{r['vocab_size']}, torch.profiler, "
                      "self CPU time over 4 steps)", "", "| op | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{op['op']}` | {op['self_ms']} | {op['share']:.1%} | {op['calls']} |" for op in r["profile"]]
        lines += ["", *ceiling_lines(r)]
    return "\n".join(lines) + "\n"


def ceiling_lines(row: dict) -> list[str]:
    """Why the MFU is what it is: the matmuls' own rate at the model's shapes and their share of the step."""
    ceiling, share, mfu = row["matmul_ceiling"], row["matmul_share"], row["bertflow"]["mfu_vs_bf16_peak"]
    return [f"At the model's own shapes ({ceiling['rows']:,} padded rows through the encoder's linear layers, "
            f"{ceiling['masked_rows']:,} masked rows through the MLM head, forward and both gradients) this CPU's "
            f"matmuls reach {ceiling['gflops_per_second']:.0f} GFLOP/s, {ceiling['of_peak']:.1%} of the square-matrix "
            f"peak: the MFU ceiling if nothing else took time. Matrix products take {share:.1%} of the profiled step; "
            f"at the ceiling's rate that alone gives {share * ceiling['of_peak']:.1%} MFU (measured: {mfu:.1%}). "
            "The rest: the copies autocast makes, GELU, LayerNorm, softmax, the loss and the optimizer."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1, help="measured steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=profile().batch_size)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile-ops", type=int, default=12, help="top ops shown from the profiled step")
    parser.add_argument("--no-ablation", action="store_true", help="skip the one-technique-less sides")
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers.Trainer side")
    parser.add_argument("--trainer-warmup", type=int, default=6,
                        help="unmeasured Trainer steps (torch.compile compiles, then recompiles for dynamic shapes)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    args = parser.parse_args()
    tr.set_threads(args.threads)
    batches, project_vocab = pretraining_examples(Paths(REPO))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(json.dumps({"peaks": peaks}), flush=True)
    rows = [measure(name, vocab, batches, args, peaks)
            for name in args.configs.split(",") for vocab in (30522, project_vocab)]
    result = {"machine": machine(), "peaks": {k: round(v, 1) for k, v in peaks.items()}, "args": vars(args),
              "rows": rows}
    write_results("pretraining", result, markdown(result))


def pretraining_examples(paths: Paths):
    """The default profile's training instances with its masking, and the project's vocabulary size."""
    from bertflow.io import read_json
    from bertflow.masking import masking_spec
    from bertflow.params import PretrainDataParams
    from bertflow.pretraining import PretrainBatches, read_shards
    from bertflow.tokenization import load_tokenizer

    ensure_output("pretrain_data", paths.pretrain_data / "info.json", paths.root)
    tokenizer = load_tokenizer(paths.tokenizer)
    info = read_json(paths.pretrain_data / "info.json")
    spec = masking_spec(tokenizer, PretrainDataParams(**info["params"]))
    return (PretrainBatches(read_shards(paths.pretrain_data / "train"), tokenizer.pad_token_id, spec, seed=0),
            len(tokenizer))


if __name__ == "__main__":
    main()
