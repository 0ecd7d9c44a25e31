"""Stage pretrain on the tiny profile: loss goes down, the fast loss is BERT's loss, resume-after-kill is exact."""

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertForPreTraining, BertForSequenceClassification

from bertflow import training as tr
from bertflow.io import InputError
from bertflow.model import compiled_masked_lm_loss, pretraining_loss
from bertflow.pretraining import PretrainBatches, read_shards
from bertflow.tokenization import load_tokenizer
from tasks.cli import run_stage
from tests.conftest import REPO, kill_stage_after_first_checkpoint

# The crashed run checkpoints twice as often as the tiny profile (every 10 steps of 60), so it is killed
# early; its resumed weights must equal the session's straight tiny run (tiny_trained): the cadence of
# checkpoints changes nothing, and neither does a kill.
RESUME = {"pretrain.checkpoint_every_steps": 10}


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_loss_goes_down(tiny_trained):
    train = rows(tiny_trained / "reports" / "pretrain" / "train.csv")
    evals = rows(tiny_trained / "reports" / "pretrain" / "eval.csv")
    assert float(train[-1]["mlm_loss"]) < float(train[0]["mlm_loss"]) - 0.5
    assert float(evals[-1]["mlm_loss"]) < float(evals[0]["mlm_loss"])
    report = json.loads((tiny_trained / "reports" / "pretrain.json").read_text())
    assert report["steps"] == 60 and report["heldout"]["mlm_accuracy"] > 0


def test_output_loads_as_a_classifier(tiny_trained):
    model = BertForSequenceClassification.from_pretrained(str(tiny_trained / "artifacts" / "pretrained"), num_labels=2)
    assert model.config.vocab_size == len(load_tokenizer(tiny_trained / "artifacts" / "pretrained"))
    assert (tiny_trained / "artifacts" / "pretrained" / "model.safetensors").is_file()


def reference_and_fast_models(root):
    reference = BertForPreTraining.from_pretrained(str(root / "artifacts" / "pretrained"))  # stock: SDPA
    fast = BertForPreTraining.from_pretrained(str(root / "artifacts" / "pretrained"))
    fast.set_attn_implementation("eager")
    tokenizer = load_tokenizer(root / "artifacts" / "tokenizer")
    batches = PretrainBatches(read_shards(root / "data" / "pretrain" / "heldout"), tokenizer.pad_token_id,
                              None, seed=0)
    return reference, fast, batches.batch(list(range(32)), mask_seed="x")


def test_fast_path_loss_and_gradients_equal_the_reference(tiny_trained):
    """The pretrain stage's step (MLM head at masked positions, eager attention, compiled loss) computes
    BERT's own loss: fp32 losses within 1e-5, every parameter's gradient within 1e-4 relative."""
    reference, fast, batch = reference_and_fast_models(tiny_trained)
    expected = reference(**batch).loss  # full-vocabulary logits at every position
    expected.backward()
    ours = pretraining_loss(fast, batch, compiled_masked_lm_loss())
    ours.loss.backward()
    assert torch.allclose(ours.loss, expected, rtol=0, atol=1e-5), (float(ours.loss), float(expected))
    assert ours.mlm_count == int((batch["labels"] != -100).sum())
    assert ours.mlm_correct == int(pretraining_loss(fast, batch).mlm_correct)  # compiled argmax = eager argmax
    for (name, a), (_, b) in zip(reference.named_parameters(), fast.named_parameters(), strict=True):
        scale = a.grad.abs().max().clamp_min(1e-6)
        assert float((a.grad - b.grad).abs().max() / scale) < 1e-4, name


def test_fast_path_loss_under_bf16_stays_near_the_fp32_reference(tiny_trained):
    """With bf16 autocast (as the stage runs where the CPU has it) the loss stays within 1 % of fp32."""
    reference, fast, batch = reference_and_fast_models(tiny_trained)
    with torch.no_grad():
        expected = float(reference(**batch).loss)
        with tr.autocast(True):
            ours = float(pretraining_loss(fast, batch, compiled_masked_lm_loss()).loss)
    assert abs(ours - expected) / expected < 0.01, (ours, expected)


def kill_after_first_checkpoint(root, overrides):
    kill_stage_after_first_checkpoint("pretrain", root, root / "artifacts" / "pretrain_checkpoints", overrides)
    assert not (root / "artifacts" / "pretrained").exists()


def fresh_root(tiny_run, path):
    for name in ("data", "artifacts/tokenizer"):
        shutil.copytree(tiny_run / name, path / name)
    return path


def test_resume_after_kill_gives_the_same_weights(tiny_run, tiny_trained, tmp_path):
    straight = tiny_trained  # pretrain of params.tiny.yaml, never interrupted
    steps = json.loads((straight / "reports" / "pretrain.json").read_text())["steps"]
    crashed = fresh_root(tiny_run, tmp_path / "crashed")
    kill_after_first_checkpoint(crashed, RESUME)
    with pytest.raises(InputError, match=r"different configuration \(model.hidden_size: 64 there, 32 now"):
        run_stage("pretrain", REPO / "params.tiny.yaml", crashed, {**RESUME, "pretrain.model.hidden_size": 32})
    figures = run_stage("pretrain", REPO / "params.tiny.yaml", crashed, RESUME)
    assert 10 <= figures["resumed_from_step"] < steps and figures["steps"] == steps
    a = load_file(straight / "artifacts" / "pretrained" / "model.safetensors")
    b = load_file(crashed / "artifacts" / "pretrained" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    steps = [int(r["step"]) for r in rows(crashed / "reports" / "pretrain" / "train.csv")]
    assert steps == sorted(set(steps)), "the curve repeats steps after resuming"


def test_vocabulary_mismatch_is_an_error(tiny_run, tiny, tmp_path):
    params, folder = tiny
    root = fresh_root(tiny_run, tmp_path / "root")
    other = tmp_path / "other"
    other.mkdir()
    from tests.conftest import write_params

    path = write_params(folder, params)
    run_stage("ingest", path, other)
    run_stage("tokenizer", path, other)  # a vocabulary of under 200 tokens
    shutil.rmtree(root / "artifacts" / "tokenizer")
    shutil.copytree(other / "artifacts" / "tokenizer", root / "artifacts" / "tokenizer")
    with pytest.raises(InputError, match=r"built with a tokenizer of 2000 tokens, but .* has \d+; re-run"):
        run_stage("pretrain", REPO / "params.tiny.yaml", root)


def test_pretraining_batches_are_built_by_length(tiny_run):
    """Consecutive batch_size groups of the epoch order have similar lengths: less padding than a shuffle."""
    import random

    from bertflow.pretraining import PretrainBatches, read_shards

    batches = PretrainBatches(read_shards(tiny_run / "data" / "pretrain" / "train"), 0, None, seed=3)
    lengths, size = batches.lengths, 8

    def padding(order):
        groups = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
        cells = sum(max(lengths[i] for i in g) * size for g in groups)
        return 1 - sum(lengths[i] for g in groups for i in g) / cells

    order = batches.order(0, size)
    assert len(set(order)) == len(order) and len(order) >= len(lengths) - size * (len(lengths) // (size * 50) + 1)
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    assert padding(order) < 0.5 * padding(shuffled)
    assert order == batches.order(0, size) and order != batches.order(1, size)
