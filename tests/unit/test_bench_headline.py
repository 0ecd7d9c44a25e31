"""The README's performance table (benchmarks/run.py ``headline``) from the committed benchmark results: every
training figure has its reference and its transformers.Trainer side, with the ratios the JSON holds."""

import json

from benchmarks.common import RESULTS
from benchmarks.run import BENCHMARKS, headline


def test_the_headline_has_the_three_sides_of_training():
    results = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in BENCHMARKS}
    table = headline(results["pretraining"], results["classifier"], results["data_stages"], results["distributed"],
                     results["variants"], results["serving"])
    mini = next(r for r in results["pretraining"]["rows"] if (r["config"], r["vocab_size"]) == ("BERT-Mini", 30522))
    tuning = results["classifier"]["finetuning"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    pretraining = rows["pretraining BERT-Mini/30522 against transformers.Trainer, tokens/s (MFU of the bf16 peak)"]
    assert pretraining.endswith(f"| {mini['vs_trainer']}× |")
    assert f"{mini['transformers.Trainer']['tokens_per_second']:,}" in pretraining
    fine_tuning = rows[f"fine-tuning against transformers.Trainer, tokens/s (batch {tuning['batch_size']})"]
    assert fine_tuning.endswith(f"| {tuning['vs_trainer']}× |")
    assert rows["pretraining BERT-Mini, vocab 30522, tokens/s"].endswith(f"| {mini['speedup']}× |")
