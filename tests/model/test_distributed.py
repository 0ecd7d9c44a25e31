"""pretrain and finetune under torchrun (2 CPU processes, gloo) against 1 process with the same global batch.

Equivalence runs in fp32 without dropout (dropout draws differ per process by design), so the only
differences left are the order of floating-point sums: every logged loss must agree within 1e-4.
The CPU runs pin ``device: cpu``, so they mean the same on a machine with GPUs. The GPU tests at the
end (one GPU against the CPU; a CPU checkpoint resumed on a GPU; nccl across two GPUs) run only where
CUDA is; CI has none and skips them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bertflow import distributed as dd
from bertflow import launch
from bertflow import training as tr
from bertflow.params import write_params_copy
from tests.conftest import REPO

# One make test worker (xdist --dist loadgroup) runs this module: they share one fixture (1- and 2-process pretraining)
pytestmark = pytest.mark.xdist_group("distributed")

SAME_MATHS = {"bf16": False, "compile_loss": False, "device": "cpu"}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def params_file(folder, pretrain: dict, finetune: dict, processes: int):
    """params.tiny.yaml with overrides, written into ``folder``."""
    return write_params_copy(REPO / "params.tiny.yaml", folder / f"params-{processes}.yaml",
                             {"pretrain": pretrain, "finetune": finetune, "distributed": {"nproc_per_node": processes}})


def run_cli(params, root, stage: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(params), "--root", str(root), stage],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def copy_root(tiny_run, path, names=("data", "artifacts/tokenizer")):
    for name in names:
        shutil.copytree(tiny_run / name, path / name)
    return path


# ---------------------------------------------------------------- pure


def test_rank_shares_partition_every_global_batch():
    order = tr.epoch_order(list(range(100)) * 3, 16, seed=1, epoch=0)
    for start in range(0, len(order) - 15, 16):
        batch = order[start:start + 16]
        shares = [dd.rank_share(batch, dd.World(size=4, rank=r)) for r in range(4)]
        assert sorted(i for share in shares for i in share) == sorted(batch)
    seen = [i for start in range(0, len(order) - 15, 16) for r in range(2)
            for i in dd.rank_share(order[start:start + 16], dd.World(size=2, rank=r))]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch, across ranks


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(Exception, match="pretrain.batch_size=10 does not split over 4 processes"):
        dd.check_split(10, dd.World(size=4), "pretrain.batch_size")


def test_torchrun_command_for_one_node_and_for_many():
    from bertflow.params import DistributedParams

    one = launch.launch_command(DistributedParams(nproc_per_node=2), ["pretrain"])
    assert "--standalone" in one and "--nproc-per-node=2" in one and one[-3:] == ["-m", "tasks.cli", "pretrain"]
    many = launch.launch_command(DistributedParams(nproc_per_node=8, nnodes=2, rdzv_endpoint="head:29400"),
                                 ["finetune"])
    assert "--nnodes=2" in many and "--rdzv-endpoint=head:29400" in many and "--standalone" not in many
    with pytest.raises(Exception, match="rdzv_endpoint"):
        launch.launch_command(DistributedParams(nnodes=2), ["pretrain"])


# ---------------------------------------------------------------- two processes against one


def pretrain_overrides(**changes) -> dict:
    model = yaml.safe_load((REPO / "params.tiny.yaml").read_text())["pretrain"]["model"]
    return {**SAME_MATHS, "max_steps": 12, "log_every": 1, "eval_every": 100, "batch_size": 16,
            "checkpoint_every_steps": 6, "model": {**model, **NO_DROPOUT}, **changes}


def finetune_overrides(**changes) -> dict:
    """One fp32 epoch without dropout, on the CPU unless ``changes`` say otherwise."""
    return {"bf16": False, "epochs": 1, "classifier_dropout": 0.0, "encoder_dropout": 0.0,
            "random_init_ablation": False, "batch_size": 32, "device": "cpu", **changes}


@pytest.fixture(scope="module")
def pretrained_both_ways(tiny_run, tmp_path_factory):
    overrides = pretrain_overrides()
    roots = {}
    for processes in (1, 2):
        root = copy_root(tiny_run, tmp_path_factory.mktemp(f"pretrain{processes}"))
        run_cli(params_file(root, overrides, {}, processes), root, "pretrain")
        roots[processes] = root
    return roots


def test_two_processes_pretrain_like_one(pretrained_both_ways):
    one, two = (rows(pretrained_both_ways[n] / "reports" / "pretrain" / "train.csv") for n in (1, 2))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [str(s) for s in range(1, 13)]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert abs(float(a[key]) - float(b[key])) < 1e-4, (a["step"], key, a[key], b[key])
    assert float(one[-1]["mlm_loss"]) < float(one[0]["mlm_loss"])  # it did learn
    reports = [json.loads((pretrained_both_ways[n] / "reports" / "pretrain.json").read_text()) for n in (1, 2)]
    assert [r["processes"] for r in reports] == [1, 2]
    assert [r["device"] for r in reports] == ["cpu", "cpu"]
    assert reports[0]["tokens"] == reports[1]["tokens"]  # the same global batches, all ranks counted
    weights = [load_file(pretrained_both_ways[n] / "artifacts" / "pretrained" / "model.safetensors") for n in (1, 2)]
    worst = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert worst < 1e-3, worst


def test_only_rank_zero_writes(pretrained_both_ways):
    root = pretrained_both_ways[2]
    checkpoints = sorted(p.name for p in (root / "artifacts" / "pretrain_checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000006", "step-00000012"]
    assert len(rows(root / "reports" / "pretrain" / "train.csv")) == 12  # one writer: no doubled rows


def test_two_processes_finetune_like_one(pretrained_both_ways, tmp_path):
    overrides = finetune_overrides()
    figures = []
    for processes in (1, 2):
        root = copy_root(pretrained_both_ways[1], tmp_path / str(processes), ("data", "artifacts"))
        run_cli(params_file(root, {}, overrides, processes), root, "finetune")
        figures.append(json.loads((root / "reports" / "finetune.json").read_text()))
    one, two = (f["pretrained"]["history"][-1] for f in figures)
    assert one["step"] == two["step"] > 0
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-4, (one, two)
    assert abs(one["dev_accuracy"] - two["dev_accuracy"]) <= 1 / 500, (one, two)
    assert [f["processes"] for f in figures] == [1, 2]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), found before any is killed."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_two_process_run_resumes_to_the_same_weights(tiny_run, tmp_path):
    overrides = pretrain_overrides(max_steps=80, checkpoint_every_steps=5)
    whole = copy_root(tiny_run, tmp_path / "whole")
    run_cli(params_file(whole, overrides, {}, 2), whole, "pretrain")

    broken = copy_root(tiny_run, tmp_path / "broken")
    params = params_file(broken, overrides, {}, 2)
    launcher = subprocess.Popen([sys.executable, "-m", "tasks.cli", "--params", str(params), "--root", str(broken),
                                 "pretrain"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    checkpoints = broken / "artifacts" / "pretrain_checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*")) and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    ranks = descendants(launcher.pid)
    assert len(ranks) >= 2, ranks  # the bertflow command became torchrun: its children are the ranks
    os.kill(launcher.pid, signal.SIGKILL)  # torchrun cannot pass SIGKILL on; the ranks must end by themselves
    launcher.wait()
    deadline = time.time() + 60
    while any(alive(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks), "ranks outlived their killed launcher"
    assert not (broken / "artifacts" / "pretrained").exists(), "the run ended before it could be killed"

    run_cli(params, broken, "pretrain")  # the same command resumes, under DDP
    report = json.loads((broken / "reports" / "pretrain.json").read_text())
    assert report["resumed_from_step"] >= 5 and report["steps"] == 80
    a, b = (load_file(root / "artifacts" / "pretrained" / "model.safetensors") for root in (whole, broken))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# ---------------------------------------------------------------- devices and backends


def test_each_process_gets_its_own_gpu_or_the_cpu():
    assert dd.select_device("auto", 0, 0, "pretrain.device") == torch.device("cpu")
    assert dd.select_device("auto", 1, 2, "pretrain.device") == torch.device("cuda", 1)
    assert dd.select_device("cpu", 1, 2, "pretrain.device") == torch.device("cpu")
    assert dd.select_device("cuda", 0, 1, "finetune.device") == torch.device("cuda", 0)
    with pytest.raises(Exception, match=r"finetune.device: cuda, but this machine has no CUDA device"):
        dd.select_device("cuda", 0, 0, "finetune.device")
    with pytest.raises(Exception, match=r"process 2 of this node has no GPU of its own \(the node has 2\)"):
        dd.select_device("auto", 2, 2, "pretrain.device")


def test_the_backend_follows_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert dd.backend("auto", cpu) == "gloo" and dd.backend("auto", gpu) == "nccl"
    assert dd.backend("gloo", gpu) == "gloo"  # allowed: gloo carries GPU tensors too, slowly
    with pytest.raises(Exception, match="distributed.backend: nccl needs the training on GPUs"):
        dd.backend("nccl", cpu)


def test_autocast_and_bf16_follow_the_device():
    cpu = torch.device("cpu")
    assert tr.use_bf16(True, cpu) and not tr.use_bf16(False, cpu)
    assert tr.use_bf16("auto", cpu) == tr.cpu_supports_bf16()
    with tr.autocast(True, cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    batch = tr.to_device({"input_ids": torch.ones(2, 3, dtype=torch.long)}, cpu)
    assert batch["input_ids"].device == cpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="these refusals are for a machine without CUDA")
@pytest.mark.parametrize(("pretrain", "distributed", "message"), [
    ({"device": "cuda"}, {}, "pretrain.device: cuda, but this machine has no CUDA device"),
    ({}, {"nproc_per_node": 2, "backend": "nccl"}, "distributed.backend: nccl needs the training on GPUs"),
    ({"device": "cuda"}, {"nproc_per_node": 2}, "pretrain.device: cuda, but this machine has no CUDA device"),
])
def test_a_gpu_setting_without_a_gpu_is_one_message_before_anything_runs(tiny_run, tmp_path, pretrain, distributed,
                                                                         message):
    root = copy_root(tiny_run, tmp_path / "root")
    params = write_params_copy(REPO / "params.tiny.yaml", tmp_path / "params.yaml",
                               {"pretrain": pretrain, "distributed": distributed})
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "--params", str(params), "--root", str(root), "pretrain"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"bertflow pretrain: error: {message}" in done.stderr
    assert "Traceback" not in done.stderr and "torch.distributed.run" not in done.stderr  # refused before launching
    assert not (root / "artifacts" / "pretrain_checkpoints").exists() and not (root / "reports").exists()


# ---------------------------------------------------------------- on GPUs (skipped where CUDA is not)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl across processes needs 2 GPUs")
GPU_TOLERANCE = 2e-3  # fp32 on both; kernels sum in other orders, and 12 steps compound it


def gpu_pretrain(root, processes: int, device: str = "cuda") -> dict:
    params = params_file(root, pretrain_overrides(device=device), {}, processes)
    run_cli(params, root, "pretrain")
    return json.loads((root / "reports" / "pretrain.json").read_text())


def assert_losses_agree(cpu_root, gpu_root) -> None:
    cpu, gpu = (rows(root / "reports" / "pretrain" / "train.csv") for root in (cpu_root, gpu_root))
    assert [r["step"] for r in cpu] == [r["step"] for r in gpu]
    for a, b in zip(cpu, gpu, strict=True):
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert abs(float(a[key]) - float(b[key])) < GPU_TOLERANCE, (a["step"], key, a[key], b[key])


@needs_cuda
def test_one_gpu_pretrains_and_finetunes_like_the_cpu(tiny_run, pretrained_both_ways, tmp_path):
    root = copy_root(tiny_run, tmp_path / "gpu")
    report = gpu_pretrain(root, 1)
    assert report["device"] == "cuda:0" and report["processes"] == 1
    assert_losses_agree(pretrained_both_ways[1], root)
    weights = load_file(root / "artifacts" / "pretrained" / "model.safetensors")  # saved from the CPU copy
    assert all(tensor.device.type == "cpu" for tensor in weights.values())

    overrides = finetune_overrides(class_weights=True)
    figures = {}
    for device in ("cpu", "cuda"):
        folder = copy_root(pretrained_both_ways[1], tmp_path / f"finetune-{device}", ("data", "artifacts"))
        run_cli(params_file(folder, {}, {**overrides, "device": device}, 1), folder, "finetune")
        figures[device] = json.loads((folder / "reports" / "finetune.json").read_text())
    assert figures["cuda"]["device"] == "cuda:0"
    cpu, gpu = (figures[d]["pretrained"]["history"][-1] for d in ("cpu", "cuda"))
    assert abs(cpu["train_loss"] - gpu["train_loss"]) < GPU_TOLERANCE, (cpu, gpu)


@needs_cuda
def test_a_cpu_checkpoint_resumes_on_a_gpu(pretrained_both_ways, tmp_path):
    """The CPU run's step-6 checkpoint, its run marked unfinished, finished on the GPU: the device is
    not part of the run's fingerprint and the state loads onto whatever device the run has now."""
    root = tmp_path / "resume"
    shutil.copytree(pretrained_both_ways[1], root)
    checkpoints = root / "artifacts" / "pretrain_checkpoints"
    shutil.rmtree(checkpoints / "step-00000012")
    run_json = json.loads((checkpoints / "run.json").read_text())
    (checkpoints / "run.json").write_text(json.dumps({**run_json, "complete": False}))
    shutil.rmtree(root / "artifacts" / "pretrained")
    run_cli(params_file(root, pretrain_overrides(device="cuda"), {}, 1), root, "pretrain")
    report = json.loads((root / "reports" / "pretrain.json").read_text())
    assert report["resumed_from_step"] == 6 and report["device"] == "cuda:0"
    a, b = (load_file(r / "artifacts" / "pretrained" / "model.safetensors") for r in (pretrained_both_ways[1], root))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2


@needs_cuda
@needs_two_gpus
def test_two_gpus_with_nccl_pretrain_like_one_cpu(tiny_run, pretrained_both_ways, tmp_path):
    root = copy_root(tiny_run, tmp_path / "nccl")
    report = gpu_pretrain(root, 2, device="auto")
    assert report["device"] == "cuda:0" and report["processes"] == 2
    assert_losses_agree(pretrained_both_ways[1], root)
