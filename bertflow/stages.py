"""The stage registry: every pipeline stage once, in the order the flow runs them.

The ``bertflow`` command's subcommands, the Prefect flow's task order, which stages go under torchrun
or to a training work pool, tracking's stage list, the report's sections and the ``params`` of each
stage in dvc.yaml (written by ``bertflow sync-dvc``) all derive from ``STAGES``. A test checks that
this order is a topological order of dvc.yaml. Reads and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the dvc.yaml stage, the module tasks/<name>.py, the params section and the Prefect task
    help: str  # one line, for ``bertflow --help``
    params: tuple[str, ...]  # the params.yaml sections (or dotted keys) it reads: its ``params`` in dvc.yaml
    distributed: bool = False  # re-runs itself under torchrun when ``distributed`` asks for more processes
    pooled: bool = False  # may go to the training work pool (``distributed.work_pool``)
    whole_params: bool = False  # ``run`` takes every section (it logs or shows them, or reads another's key)
    side_effects: bool = False  # writes outside its outputs (MLflow): never restored from DVC's run-cache

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "read sources and labeled data into data/corpus and data/labeled", ("ingest",)),
    Stage("tokenizer", "train the WordPiece vocabulary (or adopt pretrain.init's) into artifacts/tokenizer",
          ("tokenizer", "pretrain.init"), whole_params=True),
    Stage("lm_baselines", "bigram (Kneser-Ney) and LSTM language models: held-out perplexity over the word pieces",
          ("lm_baselines",)),
    Stage("pretrain_data", "build NSP pairs and MLM masks into data/pretrain", ("pretrain_data",)),
    Stage("pretrain", "pretrain BERT (MLM + NSP, MLM or ELECTRA) into artifacts/pretrained", ("pretrain",),
          distributed=True, pooled=True),
    Stage("finetune", "fine-tune the classifier into artifacts/classifier (+ the random-init ablation)",
          ("finetune",), distributed=True, pooled=True),
    Stage("evaluate", "test-set figures, held-out MLM figures and baselines into reports/evaluate", ("evaluate",)),
    Stage("attention", "attention of a chosen token, per layer and head, pretrained vs fine-tuned, into "
          "reports/attention", ("attention",)),
    Stage("optimize", "int8, ONNX, distilled and pruned variants of the classifier, measured, into "
          "artifacts/optimized", ("optimize",)),
    Stage("register", "track the run in MLflow and register the classifier (challenger/champion)", ("register",),
          whole_params=True, side_effects=True),
    Stage("report", "one self-contained HTML page of the run into reports/report.html (and its MLflow run)",
          ("report", "pretrain.model"), whole_params=True, side_effects=True),
)
BY_NAME = {stage.name: stage for stage in STAGES}
PIPELINE = tuple(stage.name for stage in STAGES)  # every stage, in the order the flow runs them
DISTRIBUTED = tuple(stage.name for stage in STAGES if stage.distributed)
POOLED = tuple(stage.name for stage in STAGES if stage.pooled)


def before(name: str) -> tuple[str, ...]:
    """The stages that run before ``name``, in order."""
    return PIPELINE[:PIPELINE.index(name)]
