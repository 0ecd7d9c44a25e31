"""``transformers.Trainer`` as a side of the throughput benchmarks: what a performance-minded user would pick.

The Trainer is configured with every built-in speed option that applies on a CPU: bf16 (where the CPU has
it), ``optim="adamw_torch_fused"``, ``torch_compile=True``, the length-grouped sampler
(``train_sampling_strategy="group_by_length"``, transformers 5's name for ``group_by_length``), eager
attention, and in-process data loading (``dataloader_num_workers=0``: on 2 cores a loader worker takes a
core from the two compute threads; pinned memory is for GPUs). Same model, same examples and batches'
contents (the caller's batch builder is its collator), same batch size, learning rate, weight decay and
gradient clipping as the other sides.

Its own ``Trainer.train()`` loop runs, and the other sides run inside it, from a callback, so the rounds
interleave as in the plain benchmarks: in even rounds the others step before the Trainer's steps, in odd
rounds after them. A Trainer step is timed from ``on_step_begin`` to ``on_step_end`` (forward, backward,
clipping, optimizer and scheduler step, zero_grad); like the other sides' timings, building the batch is
not counted. Reads and writes nothing but a temporary output folder.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import Callable

from transformers import Trainer, TrainerCallback, TrainingArguments

OPTIONS = {"optim": "adamw_torch_fused", "torch_compile": True, "train_sampling_strategy": "group_by_length",
           "dataloader_num_workers": 0, "dataloader_pin_memory": False}


class TrainerSide:
    """One Trainer run that measures its steps and calls back into the other sides' rounds."""

    name = "transformers.Trainer"

    def __init__(self, model, lengths: list[int], make_batch: Callable[[list[int]], dict], batch_size: int,
                 learning_rate: float, bf16: bool, warmup: int):
        model.set_attn_implementation("eager")
        self.model, self.lengths, self.make_batch = model, lengths, make_batch
        self.batch_size, self.learning_rate, self.bf16, self.warmup = batch_size, learning_rate, bf16, warmup
        self.pending: deque[dict] = deque()  # figures of the batches the loader built, oldest first
        self.seconds, self.tokens, self.padded, self.masked, self.sequences = 0.0, 0, 0, 0, 0

    def collate(self, examples: list[dict]) -> dict:
        batch = self.make_batch([example["index"] for example in examples])
        labels = batch.get("labels")
        self.pending.append({"tokens": int(batch["attention_mask"].sum()), "padded": batch["input_ids"].numel(),
                             "masked": int((labels != -100).sum()) if labels is not None and labels.dim() == 2 else 0,
                             "sequences": batch["input_ids"].shape[0]})
        return batch

    def run(self, rounds: int, steps: int, others: Callable[[int], None]) -> None:
        """``warmup`` unmeasured steps, then ``rounds`` × ``steps`` measured ones; ``others(round)`` runs the
        other sides' steps of that round (in the round's order)."""
        import datasets

        data = datasets.Dataset.from_dict({"index": list(range(len(self.lengths))), "length": self.lengths})
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as output:
            args = TrainingArguments(
                output_dir=output, per_device_train_batch_size=self.batch_size, learning_rate=self.learning_rate,
                weight_decay=0.01, max_grad_norm=1.0, bf16=self.bf16, use_cpu=True, length_column_name="length",
                remove_unused_columns=False, logging_strategy="no", save_strategy="no", report_to="none",
                disable_tqdm=True, max_steps=self.warmup + rounds * steps, seed=0, **OPTIONS)
            trainer = Trainer(model=self.model, args=args, train_dataset=data, data_collator=self.collate,
                              callbacks=[Interleave(self, steps, others)])
            trainer.train()

    def record(self, seconds: float) -> None:
        batch = self.pending.popleft()
        self.seconds += seconds
        self.tokens += batch["tokens"]
        self.padded += batch["padded"]
        self.masked += batch["masked"]
        self.sequences += batch["sequences"]

    def skip(self) -> None:
        self.pending.popleft()


def interleave_position(step: int, warmup: int, steps: int) -> tuple[int, int] | None:
    """(round, step within the round) of the Trainer's ``step``-th step (0-based); None in the warm-up."""
    if step < warmup:
        return None
    return divmod(step - warmup, steps)


class Interleave(TrainerCallback):
    """Times each Trainer step and runs the other sides' rounds around them."""

    def __init__(self, side: TrainerSide, steps: int, others: Callable[[int], None]):
        self.side, self.steps, self.others = side, steps, others
        self.count, self.started = 0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        position = interleave_position(self.count, self.side.warmup, self.steps)
        if position is not None and position[1] == 0 and position[0] % 2 == 0:
            self.others(position[0])
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        elapsed = time.perf_counter() - self.started
        position = interleave_position(self.count, self.side.warmup, self.steps)
        self.count += 1
        if position is None:
            self.side.skip()
            return
        self.side.record(elapsed)
        if position[1] == self.steps - 1 and position[0] % 2 == 1:
            self.others(position[0])

