"""Fine-tuning throughput and the served classifier's latency, bertflow beside transformers.Trainer and the reference.

transformers.Trainer (``benchmarks/trainer_side.py``): the same classifier with its own loss under
``Trainer.train()`` with every built-in speed option that applies on a CPU (bf16, fused AdamW,
torch.compile, length-grouped sampling, eager attention, in-process loading), on the same batches, its
loop driving the interleaved rounds. MFU against the bf16 and fp32 matmul peaks measured in the run.

Fine-tuning: the finetune stage's step (``tasks.finetune``: batches built by length, bf16 autocast
where the CPU has it, eager attention, fused AdamW, gradient clipping) against the reference: stock
``BertForSequenceClassification`` (SDPA attention), fp32, plain AdamW, a plain loop over shuffled
batches with dynamic padding and the model's own loss. Same weights (``artifacts/classifier``, or the
profile's architecture with random weights when there is none: throughput does not depend on
them), same SST-2 training phrases, the profile's batch size; the two sides alternate step by step.

Inference: the classifier as the registry serves it, i.e. logged by the register stage's own code
(``tasks.register.log_model``: the pyfunc of ``bertflow/serving.py``) into a temporary MLflow store,
registered, aliased ``champion`` and loaded back with ``mlflow.pyfunc.load_model("models:/…@champion")``,
against the reference: transformers' ``text-classification`` pipeline on the same folder (fp32).
Latency: p50/p99 of one-text calls over SST-2 dev sentences, the two alternating text by text;
throughput: texts/s in calls of 64 texts. Both return every class's probability.

Reads: ``data/labeled/{train,dev}.parquet`` + ``labels.json``, ``artifacts/classifier`` (or
``artifacts/tokenizer``), ``params.yaml``. Writes: ``benchmarks/results/classifier.{json,md}``.

    python benchmarks/classifier.py [--rounds 20] [--steps 1] [--texts 300]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
from bertflow import distributed as dd  # noqa: E402
from bertflow import training as tr  # noqa: E402
from bertflow.classification import encode, read_split  # noqa: E402
from bertflow.io import read_json  # noqa: E402
from bertflow.model import construct_config, load_classifier  # noqa: E402
from bertflow.params import FinetuneParams, load_params  # noqa: E402
from bertflow.paths import Paths  # noqa: E402
from bertflow.tokenization import load_tokenizer, save_model_folder  # noqa: E402
from tasks.finetune import classification_step  # noqa: E402

MODEL_NAME = "benchmark-classifier"


# ---------------------------------------------------------------- the classifier under test


def classifier_folder(paths: Paths, params_file: Path, scratch: Path) -> tuple[Path, str]:
    """``artifacts/classifier`` if the pipeline made one, else the profile's architecture at random."""
    if (paths.classifier / "config.json").is_file():
        return paths.classifier, "artifacts/classifier"
    ensure_output("tokenizer", paths.tokenizer, paths.root)  # and ingest's labeled data before it
    labels = read_json(paths.labeled / "labels.json")["labels"]
    folder = random_classifier(load_tokenizer(paths.tokenizer), labels, params_file, scratch / "classifier")
    return folder, "the profile's architecture, random weights (no artifacts/classifier yet)"


def random_classifier(tokenizer, labels: list[str], params_file: Path, folder: Path) -> Path:
    """A ``BertForSequenceClassification`` of the profile's ``pretrain.model`` sizes with seeded random
    weights, saved with ``tokenizer`` as the finetune stage saves a classifier."""
    from transformers import BertForSequenceClassification

    config = construct_config(load_params(params_file).pretrain.model, len(tokenizer), tokenizer.pad_token_id)
    config.update({"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                   "label2id": {label: i for i, label in enumerate(labels)}})
    torch.manual_seed(0)
    save_model_folder(BertForSequenceClassification(config), tokenizer, folder)
    return folder


# ---------------------------------------------------------------- fine-tuning


class FinetuneSide:
    """One side of the fine-tuning comparison: model, optimizer, batch order, figures so far."""

    def __init__(self, name: str, folder: Path, bertflow: bool, train, params: FinetuneParams, pad_id: int):
        self.name, self.bertflow, self.train, self.pad_id = name, bertflow, train, pad_id
        self.batch_size = params.batch_size
        self.model = load_classifier(folder).train()
        if bertflow:
            self.model.set_attn_implementation(params.attention)
            self.optimizer = tr.adamw(self.model, params.learning_rate, params.weight_decay)
            self.order = tr.epoch_order([len(ids) for ids in train.input_ids], self.batch_size, params.seed, 0)
            self.bf16 = tr.use_bf16(params.bf16)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=params.learning_rate)
            self.order = list(range(len(train.labels)))
            random.Random(0).shuffle(self.order)
            self.bf16 = False
        self.cursor, self.seconds, self.tokens, self.padded, self.sequences = 0, 0.0, 0, 0, 0

    def next_batch(self) -> dict:
        if self.cursor + self.batch_size > len(self.order):
            self.cursor = 0
        batch = self.train.batch(self.order[self.cursor:self.cursor + self.batch_size], self.pad_id)
        self.cursor += self.batch_size
        return batch

    def step(self, measure: bool) -> None:
        batch = self.next_batch()
        started = time.perf_counter()
        if self.bertflow:  # the finetune stage's own step
            classification_step(self.model, batch, None, self.bf16, dd.World())
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        else:
            self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if measure:
            self.seconds += time.perf_counter() - started
            self.tokens += int(batch["attention_mask"].sum())
            self.padded += batch["input_ids"].numel()
            self.sequences += len(batch["labels"])


PHASES = ("forward", "backward", "clip", "optimizer", "zero_grad")


def step_anatomy(side: FinetuneSide, steps: int) -> dict:
    """Milliseconds per phase of the finetune stage's step (``classification_step``'s forward and loss, its
    backward, gradient clipping, the fused AdamW step, zeroing), averaged over ``steps`` steps of the bertflow
    side, and the figures that bound it: the rows per batch, the parameters every step updates."""
    clock = dict.fromkeys(PHASES, 0.0)
    rows = 0
    for _ in range(steps):
        batch = side.next_batch()
        rows += batch["input_ids"].numel()
        marks = [time.perf_counter()]
        with tr.autocast(side.bf16):
            logits = side.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.item()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(side.model.parameters(), 1.0)
        marks.append(time.perf_counter())
        side.optimizer.step()
        marks.append(time.perf_counter())
        side.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
            clock[phase] += end - start
    embedding = side.model.get_input_embeddings().weight.numel()
    return {"ms": {phase: round(1e3 * seconds / steps, 2) for phase, seconds in clock.items()},
            "rows_per_batch": round(rows / steps), "steps": steps,
            "parameters": sum(p.numel() for p in side.model.parameters()), "word_embedding_parameters": embedding}


def gap_to_target(anatomy: dict, model, trainer_figures: dict, batch_size: int, target: float, bf16: bool) -> dict:
    """Can a step be ``target`` times the Trainer's? Its step time over ``target``, less the work both sides do
    alike whatever their forward and backward cost (clipping, the fused AdamW step over every parameter,
    zeroing), against what the forward and backward matmuls need at the model's own shapes on this CPU."""
    trainer_ms = 1e3 * batch_size / trainer_figures["sequences_per_second"]
    fixed_ms = sum(anatomy["ms"][phase] for phase in ("clip", "optimizer", "zero_grad"))
    shapes = linear_shapes(anatomy["rows_per_batch"], bert_linears(model.config))
    rate = matmul_rate(shapes, torch.bfloat16 if bf16 else torch.float32)
    matmul_ms = 1e3 * sum(2 * m * k * n for m, k, n in shapes) / (rate * 1e9)
    return {"trainer_step_ms": round(trainer_ms, 2), "target_step_ms": round(trainer_ms / target, 2),
            "fixed_ms": round(fixed_ms, 2), "matmul_ms_at_model_shapes": round(matmul_ms, 2),
            "matmul_gflops_per_second_at_model_shapes": round(rate, 1),
            "reachable": fixed_ms + matmul_ms <= trainer_ms / target}


def side_figures(side, peaks: dict) -> dict:
    """Throughput and MFU of a fine-tuning side (``FinetuneSide`` or ``TrainerSide``)."""
    return throughput_figures(side, encoder_flops_per_token(side.model, side.padded / side.sequences), peaks, 1)


def encoder_flops_per_token(model, mean_length: float) -> float:
    """Training FLOPs per token: 6 per parameter outside the embeddings (the head included) and attention's
    12·L·T·H, T the mean padded length: the same useful work whichever side does it."""
    config = model.config
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    weights = sum(p.numel() for p in model.parameters()) - embedding
    return 6 * weights + 12 * config.num_hidden_layers * mean_length * config.hidden_size


def finetuning(folder: Path, paths: Paths, params: FinetuneParams, args) -> dict:
    tokenizer = load_tokenizer(folder)
    train = encode(tokenizer, *read_split(paths, "train"), params.max_seq_length)
    sides = [FinetuneSide("reference", folder, False, train, params, tokenizer.pad_token_id),
             FinetuneSide("bertflow", folder, True, train, params, tokenizer.pad_token_id)]
    for side in sides:
        for _ in range(args.warmup):
            side.step(measure=False)
    measured = list(sides)
    if args.no_trainer:
        for round_ in range(args.rounds):
            run_round(sides, round_, args.steps)
    else:  # the Trainer's own loop drives the rounds; the other sides step inside it
        trainer = TrainerSide(load_classifier(folder).train(), [len(ids) for ids in train.input_ids],
                              lambda indices: train.batch(indices, tokenizer.pad_token_id), params.batch_size,
                              params.learning_rate, tr.use_bf16(params.bf16), args.trainer_warmup)
        trainer.run(args.rounds, args.steps, lambda round_: run_round(sides, round_, args.steps))
        measured.append(trainer)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result = {"batch_size": params.batch_size, "peaks": {k: round(v, 1) for k, v in peaks.items()},
              **{side.name: side_figures(side, peaks) for side in measured},
              "anatomy": step_anatomy(sides[1], args.anatomy_steps)}
    result["speedup"] = round(result["bertflow"]["sequences_per_second"] / result["reference"]["sequences_per_second"],
                              2)
    if not args.no_trainer:
        # tokens/s: the two samplers group by length differently, so their batches' lengths differ
        result["vs_trainer"] = round(result["bertflow"]["tokens_per_second"]
                                     / result[TrainerSide.name]["tokens_per_second"], 2)
        result["gap_to_2x_trainer"] = gap_to_target(result["anatomy"], sides[1].model, result[TrainerSide.name],
                                                    params.batch_size, 2.0, sides[1].bf16)
    return result


def run_round(sides: list[FinetuneSide], round_: int, steps: int) -> None:
    """One interleaved round, in reverse order every other round (the Trainer: last, then first)."""
    for side in sides if round_ % 2 == 0 else sides[::-1]:
        for _ in range(steps):
            side.step(measure=True)


# ---------------------------------------------------------------- serving


def scratch_registry(scratch: Path) -> str:
    """A registry in ``scratch`` (sqlite + local artifacts) as the tracking URI, and one run in it; returns
    the run's id."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{scratch / 'mlflow.db'}")
    experiment = mlflow.create_experiment("benchmark", artifact_location=(scratch / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    return run.info.run_id


def register(run_id: str, folder: Path, alias: str, runtime: str = "torch", name: str = MODEL_NAME) -> str:
    """Log a classifier or variant folder as the register stage does (``tasks.register.log_model``: the pyfunc
    of bertflow/serving.py), register it and point ``alias`` at it; returns ``models:/<name>@<alias>``."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.register import log_model

    uri = log_model(run_id, folder, example=["a gripping, funny film"], name=f"form-{alias}", runtime=runtime).model_uri
    version = mlflow.register_model(uri, name)
    MlflowClient().set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"


def served_model(folder: Path, scratch: Path):
    """The classifier registered as the register stage does, loaded back by alias."""
    import mlflow

    return mlflow.pyfunc.load_model(register(scratch_registry(scratch), folder, "champion"))


def reference_pipeline(folder: Path):
    from transformers import pipeline

    return pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu", top_k=None)


def serving(folder: Path, paths: Paths, scratch: Path, args) -> dict:
    texts = read_split(paths, "dev")[0][: args.texts]
    served, reference = served_model(folder, scratch), reference_pipeline(folder)
    calls = {"bertflow": lambda batch: served.predict(batch),
             "reference": lambda batch: reference(batch, truncation=True, batch_size=len(batch))}
    for call in calls.values():  # warm-up
        for text in texts[:10]:
            call([text])
    latency: dict[str, list[float]] = {name: [] for name in calls}
    for text in texts:  # alternating, text by text
        for name, call in calls.items():
            started = time.perf_counter()
            call([text])
            latency[name].append(time.perf_counter() - started)
    seconds = dict.fromkeys(calls, 0.0)
    for start in range(0, len(texts) - 63, 64):
        for name, call in calls.items():
            started = time.perf_counter()
            call(texts[start:start + 64])
            seconds[name] += time.perf_counter() - started
    batched = (len(texts) // 64) * 64
    result = {name: {"p50_ms": round(1e3 * float(np.percentile(latency[name], 50)), 2),
                     "p99_ms": round(1e3 * float(np.percentile(latency[name], 99)), 2),
                     "batch64_texts_per_second": round(batched / seconds[name], 1)} for name in calls}
    result["texts"] = len(texts)
    return result


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    ft, sv = result["finetuning"], result["serving"]
    ref, ours, trainer = sv["reference"], sv["bertflow"], ft.get(TrainerSide.name, {})
    return "\n".join([
        f"# Classifier: fine-tuning and serving ({machine_line(result['machine'])})", "",
        f"Model: {result['model']}. Fine-tuning batch {ft['batch_size']} of SST-2 training phrases, "
        f"{result['args']['rounds']} interleaved rounds × {result['args']['steps']} steps per side; serving over "
        f"{sv['texts']} SST-2 dev sentences.", "",
        "| fine-tuning | reference | transformers.Trainer | bertflow | vs reference | vs Trainer |",
        "|---|---|---|---|---|---|",
        f"| sequences/s | {ft['reference']['sequences_per_second']} | {trainer.get('sequences_per_second', '–')} | "
        f"{ft['bertflow']['sequences_per_second']} | {ft['speedup']}× | |",
        f"| tokens/s | {ft['reference']['tokens_per_second']:,} | {thousands(trainer.get('tokens_per_second'))} | "
        f"{ft['bertflow']['tokens_per_second']:,} | | {ft.get('vs_trainer', '–')}× |",
        f"| MFU (bf16 peak {ft['peaks']['bf16']:.0f} GFLOP/s; the reference runs fp32: fp32 peak "
        f"{ft['peaks']['fp32']:.0f}) | {ft['reference']['mfu_vs_fp32_peak']:.1%} (fp32) | "
        f"{trainer.get('mfu_vs_bf16_peak', float('nan')):.1%} | {ft['bertflow']['mfu_vs_bf16_peak']:.1%} | | |", "",
        *anatomy_lines(ft),
        "| serving | reference (transformers pipeline) | bertflow (registry champion, pyfunc) |", "|---|---|---|",
        f"| latency p50, batch 1 | {ref['p50_ms']} ms | {ours['p50_ms']} ms |",
        f"| latency p99, batch 1 | {ref['p99_ms']} ms | {ours['p99_ms']} ms |",
        f"| throughput, batch 64 | {ref['batch64_texts_per_second']} texts/s | "
        f"{ours['batch64_texts_per_second']} texts/s |", ""])


def anatomy_lines(ft: dict) -> list[str]:
    """Where a bertflow fine-tuning step's time goes, and whether 2× the Trainer fits in it."""
    anatomy, gap = ft["anatomy"], ft.get("gap_to_2x_trainer")
    ms = anatomy["ms"]
    lines = [f"Where a bertflow step goes ({anatomy['steps']} steps of {anatomy['rows_per_batch']} padded rows on "
             f"average, {sum(ms.values()):.1f} ms): " + ", ".join(f"{phase} {value} ms" for phase, value in ms.items())
             + f". The optimizer updates all {anatomy['parameters'] / 1e6:.1f} M parameters every step, "
             f"{anatomy['word_embedding_parameters'] / 1e6:.1f} M of them the word embedding.", ""]
    if gap:
        verdict = "fits" if gap["reachable"] else "does not fit"
        lines += [f"2× the Trainer means a {gap['target_step_ms']} ms step (the Trainer's: {gap['trainer_step_ms']} "
                  "ms). "
                  f"Clipping, the AdamW step and zeroing, the same work on both sides, take {gap['fixed_ms']} ms; the "
                  f"forward and backward matmuls alone need {gap['matmul_ms_at_model_shapes']} ms at the "
                  f"{gap['matmul_gflops_per_second_at_model_shapes']:.0f} GFLOP/s this CPU reaches at the model's own "
                  f"shapes: {gap['fixed_ms'] + gap['matmul_ms_at_model_shapes']:.1f} ms {verdict} in "
                  f"{gap['target_step_ms']} ms.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--steps", type=int, default=1, help="measured fine-tuning steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--texts", type=int, default=300, help="dev sentences for the latency figures")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-trainer", action="store_true", help="skip the transformers.Trainer side")
    parser.add_argument("--trainer-warmup", type=int, default=6,
                        help="unmeasured Trainer steps (torch.compile compiles, then recompiles for dynamic shapes)")
    parser.add_argument("--anatomy-steps", type=int, default=30, help="bertflow steps timed phase by phase")
    parser.add_argument("--skip-serving", action="store_true", help="fine-tuning only (results not written)")
    args = parser.parse_args()
    tr.set_threads(args.threads)
    paths = Paths(REPO)
    with tempfile.TemporaryDirectory(prefix="bench-classifier-") as tmp:
        scratch = Path(tmp)
        folder, described = classifier_folder(paths, Path(args.params), scratch)
        tuning = finetuning(folder, paths, load_params(args.params).finetune, args)
        if args.skip_serving:
            print(json.dumps(tuning, indent=2))
            return
        result = {"machine": machine(), "model": described, "args": vars(args), "finetuning": tuning,
                  "serving": serving(folder, paths, scratch, args)}
    write_results("classifier", result, markdown(result))


if __name__ == "__main__":
    main()
