"""Where every stage reads and writes, relative to one project root (the folder holding dvc.yaml).

dvc.yaml declares exactly these paths as deps/outs; tests point ``root`` at a temporary folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    @property
    def corpus(self) -> Path:
        return self.root / "data" / "corpus"

    @property
    def labeled(self) -> Path:
        return self.root / "data" / "labeled"

    @property
    def tokenizer(self) -> Path:
        return self.root / "artifacts" / "tokenizer"

    @property
    def pretrain_data(self) -> Path:
        return self.root / "data" / "pretrain"

    @property
    def pretrained(self) -> Path:
        return self.root / "artifacts" / "pretrained"

    @property
    def pretrain_checkpoints(self) -> Path:
        return self.root / "artifacts" / "pretrain_checkpoints"

    @property
    def classifier(self) -> Path:
        return self.root / "artifacts" / "classifier"

    @property
    def ablation(self) -> Path:
        """Ablation models: ``random_init/`` is the same fine-tuning from random weights; ``seeds/`` holds the
        further fine-tuning seeds (``finetune.seeds``), see ``replica``."""
        return self.root / "artifacts" / "ablation"

    def replica(self, kind: str, seed: int) -> Path:
        """The model of a further fine-tuning seed (``kind``: pretrained or random_init), kept for evaluate's
        paired test over seeds; the first seed's are ``classifier`` and ``ablation/random_init``."""
        return self.ablation / "seeds" / f"{kind}_seed{seed}"

    @property
    def finetune_checkpoints(self) -> Path:
        return self.root / "artifacts" / "finetune_checkpoints"

    @property
    def optimized(self) -> Path:
        """Faster variants of the classifier, one folder each (``bertflow optimize``)."""
        return self.root / "artifacts" / "optimized"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, stage: str) -> Path:
        return self.root / "reports" / f"{stage}.json"
