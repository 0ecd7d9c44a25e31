"""The params.yaml schema: one typed, validated model per stage section.

Reads a params file (YAML) and returns a ``Params`` object; writes nothing. Every section forbids
unknown keys, so a typo in params.yaml fails before any work starts, with one message that names
the key and what is allowed there. Relative source paths are resolved against the folder of the
params file (the folder DVC runs from).
"""

from __future__ import annotations

import os
import typing
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

HF_PREFIX = "hf:"
SCRATCH = "scratch"  # pretrain.init: random weights
PRETRAINED = "pretrained"  # finetune.init: artifacts/pretrained


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and every faulty key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_local_path(value: str, info: ValidationInfo) -> str:
    """Resolve a local path against the params folder and insist that it exists."""
    if value.startswith(HF_PREFIX):
        return value
    base = Path((info.context or {}).get("base_dir", "."))
    path = Path(os.path.abspath(base / value))  # as written: a symbolic link on the way stays in the path
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return str(path)


class CorpusSource(Section):
    path: str = Field(description="local file or folder, or hf:<dataset>[:<config>]")
    document_boundary: Literal["blank_line", "file"] = Field(
        "blank_line", description="a blank line ends a document, or each file is one document")
    text_field: str = Field("text", description="field holding the text in .jsonl records and hf datasets")
    split: str = Field("train", description="split to read from an hf: dataset")

    _path_exists = field_validator("path")(_check_local_path)

    @property
    def is_hf(self) -> bool:
        return self.path.startswith(HF_PREFIX)


class CorpusParams(Section):
    sources: list[CorpusSource] = Field(min_length=1)
    min_document_chars: int = Field(200, ge=0, description="documents shorter than this are dropped")
    heldout_fraction: float = Field(0.02, gt=0, lt=1)
    on_decode_error: Literal["fail", "skip", "replace"] = "fail"
    max_documents: int | None = Field(None, ge=2, description="stop after this many documents (tiny profiles)")
    batch_documents: int = Field(10_000, ge=1, description="documents held per split before they are written "
                                 "(a parquet row group): with one source document, what bounds ingest's memory")


class LabeledParams(Section):
    train: str
    dev: str | None = None
    test: str | None = None
    format: Literal["auto", "tsv", "csv", "jsonl"] = "auto"
    header: bool = Field(True, description="first row names the columns (tsv/csv)")
    text_column: str | int = Field("sentence", description="column name, or 0-based index without header")
    label_column: str | int = "label"
    dev_fraction: float = Field(0.1, gt=0, lt=0.5, description="carved from train when dev is absent")
    test_fraction: float = Field(0.1, gt=0, lt=0.5, description="carved from train when test is absent")
    on_bad_row: Literal["drop", "fail"] = "drop"
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows per file (tiny profiles)")

    _paths_exist = field_validator("train", "dev", "test")(
        lambda value, info: None if value is None else _check_local_path(value, info))


class IngestParams(Section):
    corpus: CorpusParams
    labeled: LabeledParams


class TokenizerParams(Section):
    vocab_size: int = Field(16384, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    limit_alphabet: int = Field(1000, ge=1)
    lowercase: bool = True
    strip_accents: bool | None = Field(None, description="null: strip when lowercasing, as BERT does")
    include_labeled_train: bool = Field(True, description="also learn from the labeled training texts")
    model_max_length: int | None = Field(
        None, ge=8, description="null: the model's positions (pretrain.model.max_position_embeddings, or the "
        "checkpoint's when its vocabulary is adopted); model folders always say their own positions")


class PretrainDataParams(Section):
    max_seq_length: int = Field(128, ge=8, le=8192)
    short_seq_prob: float = Field(0.1, ge=0, le=1)
    dupe_factor: int = Field(2, ge=1, le=100)
    masked_lm_prob: float = Field(0.15, gt=0, lt=1)
    max_predictions_per_seq: int = Field(20, ge=1)
    do_whole_word_mask: bool = False
    masking: Literal["static", "dynamic"] = Field(
        "dynamic", description="static: masks stored in the shards; dynamic: the collator masks each epoch")
    random_seed: int = 12345
    num_proc: int = Field(2, ge=1, le=256)
    shard_tokens: int = Field(2_000_000, ge=1000, description="source tokens per work unit / shard, estimated from "
                              "UTF-8 bytes (4 a token) as it streams; num_proc + 1 units in flight bound memory")
    include_labeled_train: bool = Field(
        False, description="also pretrain on the labeled training texts (task-adaptive MLM; labels unused)")
    labeled_rows_per_document: int = Field(8, ge=1, description="labeled texts grouped into one pseudo-document")
    labeled_repeat: int = Field(1, ge=1, le=100, description="copies of the labeled texts, each grouped anew")
    next_sentence: bool = Field(
        True, description="true: [CLS] A [SEP] B [SEP] pairs for next-sentence prediction; false: one segment of "
        "contiguous sentences of a document up to max_seq_length (RoBERTa's packing; objective mlm or electra)")


Bf16 = bool | Literal["auto"]
Device = Literal["auto", "cpu", "cuda"]
DEVICE_HELP = "auto: each process its own GPU (cuda:LOCAL_RANK) when CUDA is there, else the CPU"


class BertModelParams(Section):
    hidden_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(4, ge=1, le=48)
    num_attention_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)
    max_position_embeddings: int = Field(512, ge=8)
    hidden_dropout_prob: float = Field(0.1, ge=0, lt=1)
    attention_probs_dropout_prob: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        return self


class BudgetFields(Section):
    """``max_steps`` or ``budget_minutes``: exactly one, or at most one where ``budget_optional`` (something
    else, such as an epoch cap, can end the run)."""

    budget_optional: ClassVar[bool] = False
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; or give budget_minutes")
    budget_minutes: float | None = Field(None, gt=0, description="wall-clock budget; the schedule follows it")

    @model_validator(mode="after")
    def _one_budget(self):
        given = (self.max_steps is not None) + (self.budget_minutes is not None)
        if given == 2 or (given == 0 and not self.budget_optional):
            raise ValueError(f"give {'at most' if self.budget_optional else 'exactly'} one of max_steps and "
                             "budget_minutes" + (" (null both: epochs alone decides)" if self.budget_optional else ""))
        return self


class ElectraParams(Section):
    """ELECTRA (Clark et al. 2020): a small masked-LM generator fills the masked positions with samples and the
    encoder (the discriminator) learns which word pieces were replaced."""

    generator_size: float = Field(
        0.25, gt=0, le=1, description="the generator's hidden size, intermediate size and heads as a fraction of the "
        "discriminator's (ELECTRA: 1/4 for small models); the heads must divide the width")
    rtd_weight: float = Field(50.0, gt=0, description="weight of the replaced-token-detection loss (ELECTRA: 50)")


class PretrainParams(BudgetFields):
    init: str = Field(
        SCRATCH, description="scratch (random weights, sizes from pretrain.model), or a BERT checkpoint to "
        "continue from: a local save_pretrained folder or hf:<repo id>[@revision] (sizes and vocabulary then come "
        "from it; the tokenizer stage adopts its vocabulary)")
    architecture: Literal["bert", "megatron_bert"] = Field(
        "bert", description="bert: post-LayerNorm BERT; megatron_bert: pre-LayerNorm (transformers' MegatronBert), "
        "stable at higher peak learning rates. From a checkpoint (init), it must name the checkpoint's own")
    model: BertModelParams = BertModelParams()
    objective: Literal["mlm_nsp", "mlm", "electra"] = Field(
        "mlm_nsp", description="mlm_nsp: masked LM + next-sentence prediction (BERT); mlm: masked LM alone "
        "(RoBERTa); electra: replaced-token detection against a small masked-LM generator")
    electra: ElectraParams = ElectraParams()
    embedding_init_std: float | None = Field(
        None, gt=0, le=1, description="standard deviation of the word-piece, position and segment embeddings at "
        "initialisation (null: the config's initializer_range, 0.02). Pre-LN BERT has no LayerNorm after its "
        "embeddings, so at 0.02 the first attention layer's output, nearly the same at every position, drowns them "
        "(benchmarks/results/pretraining_sweep.md); from scratch only")
    short_seq_fraction: float = Field(
        0.0, ge=0, lt=1, description="the first fraction of the budget trains on instances cut to short_seq_length "
        "(a sequence-length schedule; 0: off); held-out figures always use full instances")
    short_seq_length: int = Field(64, ge=8, description="the length of the short phase (short_seq_fraction)")
    batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_epsilon: float = Field(1e-6, gt=0)
    warmup_fraction: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    device: Device = Field("auto", description=DEVICE_HELP)
    bf16: Bf16 = Field("auto", description="bf16 autocast: true, false, or auto (when the device has bf16)")
    attention: Literal["eager", "sdpa"] = Field(
        "eager", description="attention kernel while pretraining (eager beats CPU SDPA at these lengths)")
    compile_loss: bool = Field(True, description="torch.compile the masked-LM loss (needs a C++ compiler)")
    eval_every: int = Field(500, ge=1)
    eval_instances: int | None = Field(2000, ge=1)
    log_every: int = Field(50, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_minutes: float | None = Field(5.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 42
    num_threads: int | None = Field(None, ge=1)

    @field_validator("init")
    @classmethod
    def _init_exists(cls, value: str, info: ValidationInfo) -> str:
        return value if value == SCRATCH else _check_local_path(value, info)

    @model_validator(mode="after")
    def _embedding_init_from_scratch(self):
        if self.embedding_init_std is not None and self.init != SCRATCH:
            raise ValueError(f"embedding_init_std {self.embedding_init_std} initialises a model from scratch, but "
                             f"init is {self.init}; set init: scratch or embedding_init_std: null")
        return self

    @model_validator(mode="after")
    def _generator_heads_divide(self):
        if self.objective == "electra":
            generator_sizes(self.model, self.electra.generator_size)
        return self


def generator_sizes(model: BertModelParams, fraction: float) -> dict:
    """The ELECTRA generator's width, feed-forward size and heads: ``fraction`` of the discriminator's."""
    sizes = {key: max(1, round(getattr(model, key) * fraction))
             for key in ("hidden_size", "intermediate_size", "num_attention_heads")}
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(f"electra.generator_size {fraction} gives a generator of hidden_size {sizes['hidden_size']} "
                         f"and {sizes['num_attention_heads']} heads, which do not divide it; choose a fraction that "
                         "keeps the heads dividing the width")
    return sizes


def objective_data_error(objective: str, next_sentence: bool) -> str | None:
    """Why ``pretrain.objective`` cannot train on data built with ``pretrain_data.next_sentence``, or None."""
    if objective == "mlm_nsp" and not next_sentence:
        return ("pretrain.objective: mlm_nsp trains next-sentence prediction but pretrain_data.next_sentence is false "
                "(single segments, no next-sentence labels); set pretrain_data.next_sentence: true, or "
                "pretrain.objective: mlm or electra")
    return None


class BigramParams(Section):
    discount: float | None = Field(
        None, gt=0, lt=1, description="Kneser-Ney discount; null: Ney's estimate n1 / (n1 + 2 n2) from training")


class LstmParams(BudgetFields):
    enabled: bool = Field(True, description="train the LSTM baseline; false: only the counting models")
    embedding_size: int = Field(128, ge=1)
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(1, ge=1)
    cutoffs: list[int] = Field([2000, 8000], description="adaptive-softmax cluster bounds (classes by frequency)")
    batch_size: int = Field(64, ge=1, description="sentences per step")
    learning_rate: float = Field(2e-3, gt=0, lt=1)
    log_every: int = Field(50, ge=1, description="steps averaged into one row of reports/lm_baselines/lstm.csv")
    seed: int = 42


class LmBaselinesParams(Section):
    max_train_sentences: int | None = Field(None, ge=1, description="train-split sentences used (null: all)")
    bigram: BigramParams = BigramParams()
    lstm: LstmParams = Field(default_factory=lambda: LstmParams(budget_minutes=5.0))
    num_threads: int | None = Field(2, ge=1)


class FinetuneParams(BudgetFields):
    """Epoch after epoch until the budget (``max_steps`` or ``budget_minutes``; null: none) is spent, early
    stopping ends it, or ``epochs`` is reached; the learning-rate schedule is laid over the first of
    these to come (the budget or the epoch cap), and the best dev evaluation's weights are kept. Minutes
    count training steps, not dev evaluations, as pretrain's do."""

    budget_optional: ClassVar[bool] = True
    init: str = Field("pretrained", description="'pretrained' (artifacts/pretrained) or a local BERT checkpoint folder")
    random_init_ablation: bool = Field(True, description="also fine-tune the same model from random weights")
    seeds: int = Field(1, ge=1, le=20, description=(
        "fine-tune the classifier (and the random-init ablation) with this many seeds: seed, seed+1, ...; "
        "evaluate tests pretraining's gain over all of them. The first seed's classifier is the one registered"))
    max_seq_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(3, ge=1, description="at most this many epochs; with a budget, a cap the budget or early "
                                             "stopping should end the run before")
    early_stopping_patience: int = Field(
        2, ge=1, description="dev evaluations (each epoch end, and every eval_every_steps) without a better dev "
                             "metric before stopping")
    eval_every_steps: int | None = Field(
        None, ge=1, description="also score dev every this many steps inside an epoch (null: at epoch ends only)")
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency")
    classifier_dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the classifier head (bert; "
                                      "megatron_bert's head uses the encoder's hidden_dropout_prob)")
    encoder_dropout: float | None = Field(None, ge=0, lt=1, description="null: keep the starting model's rates")
    max_grad_norm: float = Field(1.0, gt=0)
    device: Device = Field("auto", description=DEVICE_HELP)
    bf16: Bf16 = "auto"
    attention: Literal["eager", "sdpa"] = Field("eager", description="attention kernel while fine-tuning")
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_minutes: float | None = Field(5.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 42
    num_threads: int | None = Field(None, ge=1)

    @field_validator("init")
    @classmethod
    def _init_exists(cls, value: str, info: ValidationInfo) -> str:
        return value if value == PRETRAINED else _check_local_path(value, info)

    @property
    def run_kinds(self) -> list[str]:
        """The models trained per seed: the classifier, and its random-init twin with ``random_init_ablation``."""
        return ["pretrained", "random_init"] if self.random_init_ablation else ["pretrained"]

    @property
    def run_count(self) -> int:
        """How many models the finetune stage trains (``tasks.finetune.planned_runs`` has one per run)."""
        return self.seeds * len(self.run_kinds)

class EvaluateParams(Section):
    batch_size: int = Field(128, ge=1)
    majority_baseline: bool = True
    tfidf_baseline: bool = True
    tfidf_analyzer: Literal["word", "char_wb"] = Field("word", description="char_wb for unsegmented text (Chinese)")
    tfidf_ngram_max: int = Field(2, ge=1, le=5)
    tfidf_c: float = Field(16.0, gt=0, description="inverse regularisation strength of the logistic regression")
    heldout_instances: int | None = Field(None, ge=1, description="held-out pretraining instances to score (null: all)")
    num_threads: int | None = Field(2, ge=1, description="fixed, so figures are identical from run to run")
    bootstrap_resamples: int = Field(10_000, ge=100, description="resamples of the test rows for the 95 % "
                                     "percentile interval of the classifier's accuracy")
    bootstrap_seed: int = Field(0, description="seed of those resamples: the same seed, the same interval")


class AttentionSentence(Section):
    text: str = Field(min_length=1)
    token: str = Field(min_length=1, description="a word of the text: its first word piece is the query")


class AttentionParams(Section):
    sentences: list[AttentionSentence] = Field(
        [AttentionSentence(text="The animal didn't cross the street because it was too tired", token="it")],
        min_length=1)
    num_threads: int | None = Field(2, ge=1)


class ReportParams(Section):
    log_to_mlflow: bool = Field(True, description="log reports/report.html to the MLflow run of the register stage")


VARIANTS = ("int8", "onnx", "onnx_int8", "student", "pruned")


class StudentParams(Section):
    """The distilled student's shape; null keeps the teacher's value."""

    num_hidden_layers: int | None = Field(2, ge=1, le=48, description="null: the teacher's depth")
    hidden_size: int | None = Field(None, ge=8, description="null: the teacher's width")
    num_attention_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=8)
    init: Literal["pretrained", "teacher", "random"] = Field(
        "pretrained", description="weights copied where shapes allow: artifacts/pretrained, the teacher, or none")


class DistillParams(Section):
    student: StudentParams = StudentParams()
    temperature: float = Field(2.0, gt=0, description="softens teacher and student outputs in the soft loss")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (teacher) loss; 1 - alpha: true labels")
    unlabeled_sentences: int = Field(0, ge=0, description="extra corpus sentences labeled by the teacher only")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    log_every: int = Field(50, ge=1)
    seed: int = 42


class PruneParams(Section):
    sparsity: float = Field(0.5, gt=0, lt=1, description="share of the encoder's linear weights set to zero")
    recovery_steps: int = Field(300, ge=0, description="fine-tuning steps with the pruning mask held")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    seed: int = 42


class OptimizeParams(Section):
    variants: list[Literal[VARIANTS]] = Field(list(VARIANTS), description=f"which of {', '.join(VARIANTS)}")
    onnx_opset: int = Field(17, ge=13)
    onnx_tolerance: float = Field(1e-4, gt=0, description="largest |ONNX - PyTorch| probability allowed (fp32)")
    onnx_fusion: Literal["auto", "on", "off"] = Field(
        "auto", description="ONNX Runtime's transformer fusions on the onnx/onnx_int8 graphs; auto: kept where "
                            "faster on the test texts at equal outputs (onnx_tolerance)")
    distill: DistillParams = DistillParams()
    prune: PruneParams = PruneParams()
    latency_sentences: int = Field(300, ge=10, description="test sentences timed one at a time (batch 1)")
    throughput_batch_size: int = Field(64, ge=1)
    rounds: int = Field(3, ge=1, description="interleaved timing rounds over all variants")
    num_threads: int | None = Field(2, ge=1, description="threads of every runtime while timing")
    max_seq_length: int | None = Field(
        None, ge=8, description="training length of the student and pruned model (null: the classifier's, as served)")
    bf16: Bf16 = Field("auto", description="bf16 autocast while the teacher scores the distillation rows and while "
                                           "the student and the pruned model train (as finetune.bf16); the variants "
                                           "are saved, served and measured in fp32")


class RegisterParams(Section):
    model_name: str = Field("bertflow-classifier", min_length=1, description="registered model name")
    experiment: str = Field("bertflow", min_length=1, description="MLflow experiment of the pipeline runs")
    tracking_uri: str | None = Field(
        None, description="null: $MLFLOW_TRACKING_URI, else the embedded SQLite registry under mlruns/")
    metric: Literal["accuracy", "macro_f1"] = Field("accuracy", description="test metric the promotion gate compares")
    min_delta: float = Field(0.0, ge=0, description="how much the new version must beat the champion by")
    retries: int = Field(3, ge=0, description="further attempts when the registry does not answer")
    backoff_seconds: float = Field(2.0, ge=0, description="wait before the first retry; doubled each time")
    timeout_seconds: float = Field(30.0, gt=0, description="HTTP timeout of one registry request")
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="alias `fast`: the quickest variant at most this far below the champion")


class ScheduleParams(Section):
    """The Prefect deployment of the pipeline flow (``bertflow-flow serve``); not a stage, not in dvc.yaml."""

    deployment: str = Field("nightly", min_length=1, description="deployment name (flow 'bertflow')")
    cron: str = Field("0 3 * * *", description="when to run, a cron string")
    timezone: str = Field("UTC", description="IANA time zone of the cron string")
    lock_wait_seconds: float = Field(3600.0, ge=0, description="how long a scheduled run waits for a running one")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) not in (5, 6):
            raise ValueError(f"not a cron string (5 fields, e.g. '0 3 * * *'): {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'Europe/Berlin')") from None
        return value


class DistributedParams(Section):
    """pretrain and finetune across processes (torchrun + DDP); 1 process on 1 node is the plain run."""

    nproc_per_node: int = Field(1, ge=1, description="processes here (CPU: at most the cores; GPU: one per GPU)")
    nnodes: int = Field(1, ge=1, description="nodes; more than one needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous (multi-node)")
    rdzv_id: str = Field("bertflow", min_length=1, description="rendezvous id shared by the nodes of one run")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPUs, gloo on the CPU")
    work_pool: str | None = Field(None, description="Prefect work pool for pretrain/finetune (null: run in the flow)")
    deployment: str = Field("training", min_length=1, description="name of the bertflow-stage deployment there")


warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows')  # ABC.register; harmless


class Params(Section):
    ingest: IngestParams
    tokenizer: TokenizerParams
    lm_baselines: LmBaselinesParams
    pretrain_data: PretrainDataParams
    pretrain: PretrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    attention: AttentionParams
    optimize: OptimizeParams
    register: RegisterParams
    report: ReportParams
    schedule: ScheduleParams = ScheduleParams()
    distributed: DistributedParams = DistributedParams()

    def budget_seconds(self, stage: str) -> float | None:
        """``stage``'s wall-clock training budget in seconds, all its runs together; None where no clock bounds
        it (a step or epoch budget, or a stage without one)."""
        if stage == "pretrain":
            minutes = self.pretrain.budget_minutes
        elif stage == "finetune":
            minutes = self.finetune.budget_minutes and self.finetune.budget_minutes * self.finetune.run_count
        elif stage == "lm_baselines":
            lstm = self.lm_baselines.lstm
            minutes = lstm.budget_minutes if lstm.enabled else None
        else:
            minutes = None
        return None if minutes is None else minutes * 60.0


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate a params file; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    raw = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    try:
        params = Params.model_validate(raw, context={"base_dir": Path(os.path.abspath(path)).parent})
    except ValidationError as exc:
        raise ParamsError(_format_errors(path, exc)) from None
    across = objective_data_error(params.pretrain.objective, params.pretrain_data.next_sentence)
    if across:
        raise ParamsError(f"{path}: invalid params\n  {across}")
    return params


def write_params_copy(source: str | Path, target: Path, sections: dict[str, dict]) -> Path:
    """``source`` validated, ``sections`` merged over its sections, written to ``target``.

    Paths come out absolute (validation resolved them), so the copy works from any folder: what
    tests and benchmarks use to run a profile with changes in a scratch root.
    """
    raw = load_params(source).model_dump(mode="json")
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    target.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return target


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for the key ``a.b.c`` of a params mapping, making the sections it lacks."""
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def get_dotted(raw: dict, dotted: str) -> Any:
    """``raw[a][b][c]`` for the key ``a.b.c`` of a params mapping; ``{}`` where a section is missing."""
    node = raw
    for key in dotted.split("."):
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid params"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        lines.append(f"  {key}: {_describe(error)}")
    return "\n".join(lines)


def _describe(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"unknown key; allowed keys here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error.get("input"), dict):  # a rule over a whole section: the message says what it saw
        return message
    return f"{message} (got {error.get('input')!r})"


def _allowed_keys(loc: tuple) -> list[str]:
    """The field names of the model reached by following ``loc`` from ``Params``."""
    model: Any = Params
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = _model_in(annotation)
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None



# ---------------------------------------------------------------- every field written out (for DVC)


def fill_defaults(raw: dict, validated: BaseModel, prefix: str = "") -> list[str]:
    """Write every field ``raw`` leaves out, with the value it validated to, into ``raw``; returns their keys.

    DVC hashes only what params.yaml says, so a field left to its default in code is invisible to it:
    ``bertflow sync-dvc`` fills them in (keeping what is written), and the stages refuse a params.yaml
    that still lacks one (``missing_fields``). Works on plain dicts and on ruamel's round-trip maps.
    """
    added = []
    dumped = validated.model_dump(mode="json")
    for name in type(validated).model_fields:
        value = getattr(validated, name)
        key = f"{prefix}{name}"
        if name not in raw:
            raw[name] = dumped[name]
            added.append(key)
        elif isinstance(value, BaseModel) and isinstance(raw[name], dict):
            added += fill_defaults(raw[name], value, f"{key}.")
        elif isinstance(value, list | tuple) and isinstance(raw[name], list):
            for index, (item, written) in enumerate(zip(value, raw[name], strict=False)):
                if isinstance(item, BaseModel) and isinstance(written, dict):
                    added += fill_defaults(written, item, f"{key}.{index}.")
    return added


def missing_fields(path: str | Path, validated: Params | None = None) -> list[str]:
    """The dotted keys a valid params file leaves to their defaults (none once ``sync-dvc`` has run);
    ``validated``: the file's ``load_params``, when the caller has it already (no second validation)."""
    import copy

    raw = _read_yaml(Path(path))
    return fill_defaults(copy.deepcopy(raw), validated or load_params(path))
