"""ELECTRA pretraining (Clark et al. 2020; google-research/electra): a small masked-LM generator fills the masked
positions with samples from its softmax, and the encoder, as a discriminator, learns which word pieces were replaced.

Both are encoders of the run's family (``BertModel`` or ``MegatronBertModel``, no pooler). What is shared, as in
ELECTRA: the discriminator's embedding layer (word pieces, positions, segments; ELECTRA's embedding size is the
discriminator's width) feeds the generator through a linear projection to the generator's width (ELECTRA's
``embeddings_project``), and the generator's output layer is the same word-piece table (transformers'
``ElectraGeneratorPredictions`` maps back to that width), so the generator's softmax trains every word-piece
embedding. The generator's own embedding tables are therefore unused: its word table is frozen, its position and
segment tables frozen at zero. The discriminator's head is transformers' ``ElectraDiscriminatorPredictions``
(dense, activation, one logit per position).

Reads and writes only what it is handed: ``save`` writes the discriminator as a bare encoder in
``save_pretrained`` layout (what every later stage loads) plus ``electra/`` (the generator and both heads, for
evaluate's held-out figures; not a model to serve), ``load`` reads them back.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import ElectraConfig
from transformers.models.electra.modeling_electra import ElectraDiscriminatorPredictions, ElectraGeneratorPredictions

from bertflow import architectures
from bertflow.io import InputError
from bertflow.model import PretrainingOutput, init_embeddings, masked_lm_loss
from bertflow.params import generator_sizes

EXTRAS = "electra"  # the sub-folder of the pretrained model holding the generator and the heads
GENERATOR_CONFIG = "generator_config.json"
WEIGHTS = "generator_and_heads.safetensors"


class Electra(torch.nn.Module):
    """The discriminator (the encoder being pretrained), its replaced-token head, and the generator."""

    def __init__(self, discriminator, generator):
        super().__init__()
        config, small = discriminator.config, generator.config
        self.discriminator = discriminator
        self.rtd_head = ElectraDiscriminatorPredictions(config)
        self.generator = generator
        self.generator_input = torch.nn.Linear(config.hidden_size, small.hidden_size)
        self.generator_head = ElectraGeneratorPredictions(ElectraConfig(
            hidden_size=small.hidden_size, embedding_size=config.hidden_size, layer_norm_eps=config.layer_norm_eps))
        self.generator_bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        for module in (self.rtd_head, self.generator_input, self.generator_head):
            module.apply(lambda m: _init(m, config.initializer_range))
        embeddings = generator.embeddings
        embeddings.word_embeddings.weight.requires_grad_(False)  # its input is the discriminator's table
        for table in (embeddings.position_embeddings, embeddings.token_type_embeddings):
            torch.nn.init.zeros_(table.weight)  # the shared embedding layer already holds positions and segments
            table.weight.requires_grad_(False)

    @property
    def config(self):
        return self.discriminator.config

    @property
    def device(self) -> torch.device:
        return self.discriminator.device

    def generator_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Word-piece logits of generator states: back to the shared width, then the shared word-piece table."""
        table = self.discriminator.embeddings.word_embeddings.weight
        return F.linear(self.generator_head(hidden), table, self.generator_bias)


def _init(module: torch.nn.Module, std: float) -> None:
    """BERT's initialisation of the heads: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.normal_(module.weight, std=std)
        torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.LayerNorm):
        torch.nn.init.ones_(module.weight)
        torch.nn.init.zeros_(module.bias)


def generator_config(config, fraction: float):
    """The discriminator's config with ``fraction`` of its width, feed-forward size and heads (same depth)."""
    small = copy.deepcopy(config)
    small.update(generator_sizes(config, fraction))
    return small


def construct(config, fraction: float, seed: int, attention: str = "sdpa",
              embedding_std: float | None = None) -> Electra:
    """Random weights from ``seed``; ``attention`` (eager or sdpa) and ``embedding_std`` (the shared embedding
    tables' initial standard deviation) as for the other objectives."""
    architecture = architectures.architecture_of(config.model_type, "model config")
    encoder = architectures.encoder_class(architecture)
    torch.manual_seed(seed)
    model = Electra(encoder(config, add_pooling_layer=False),
                    encoder(generator_config(config, fraction), add_pooling_layer=False))
    init_embeddings(model.discriminator.embeddings, embedding_std)
    for part in (model.discriminator, model.generator):
        architectures.set_attention(part, attention)
    return model


def noise_generator(seed: str, device: torch.device) -> torch.Generator:
    """The sampling generator of one micro-batch, from a string that names it (run seed, step, micro-batch,
    rank): the samples depend on nothing else, so a resumed run draws exactly what the uninterrupted one drew."""
    number = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(number)


def sample(logits: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """One draw from each row's softmax (the Gumbel-max trick: argmax of logits + Gumbel noise)."""
    uniform = torch.rand(logits.shape, generator=noise, device=logits.device, dtype=torch.float32)
    return (logits.float() - torch.log(-torch.log(uniform.clamp_min(1e-10)))).argmax(-1)


def corrupt(input_ids: torch.Tensor, selected: torch.Tensor, originals: torch.Tensor,
            sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the discriminator's input, replaced flags): the masked positions hold the samples; a sample equal to the
    original word piece counts as original, as in ELECTRA."""
    corrupted = input_ids.clone()
    corrupted[selected] = sampled
    original = input_ids.clone()
    original[selected] = originals
    return corrupted, corrupted != original


def electra_loss(model: Electra, batch: dict[str, torch.Tensor], noise: torch.Generator, rtd_weight: float,
                 mlm_loss=masked_lm_loss) -> PretrainingOutput:
    """The generator's masked-LM loss (its head only at the masked positions) + ``rtd_weight`` × the
    discriminator's replaced-token-detection loss over every non-padding position."""
    labels, mask = batch["labels"], batch["attention_mask"]
    selected = labels != -100
    targets = labels[selected]
    shared = model.discriminator.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    hidden = model.generator(inputs_embeds=model.generator_input(shared), attention_mask=mask,
                             token_type_ids=batch["token_type_ids"], return_dict=False)[0]
    logits = model.generator_logits(hidden[selected])
    mlm, mlm_correct = mlm_loss(logits, targets)
    with torch.no_grad():
        corrupted, replaced = corrupt(batch["input_ids"], selected, targets, sample(logits.detach(), noise))
    states = model.discriminator(input_ids=corrupted, attention_mask=mask, token_type_ids=batch["token_type_ids"],
                                 return_dict=False)[0]
    active = mask.bool()
    scores = model.rtd_head(states)[active].float()
    truth = replaced[active]
    rtd = F.binary_cross_entropy_with_logits(scores, truth.float())
    return PretrainingOutput(
        loss=mlm + rtd_weight * rtd, mlm_loss=mlm, nsp_loss=torch.zeros((), device=mlm.device),
        mlm_correct=int(mlm_correct), mlm_count=int(targets.numel()), nsp_correct=0, nsp_count=0,
        rtd_loss=rtd, rtd_correct=int(((scores > 0) == truth).sum()), rtd_count=int(truth.numel()),
        rtd_scores=scores.detach(), rtd_labels=truth)


# ---------------------------------------------------------------- saved form


def save(model: Electra, tokenizer, folder: Path, save_model_folder) -> None:
    """The discriminator as the pretrained encoder (``save_model_folder``: weights, config, tokenizer), and
    ``electra/`` with the generator's config and the weights of the generator and both heads."""
    save_model_folder(model.discriminator, tokenizer, folder)
    extras = folder / EXTRAS
    extras.mkdir()
    model.generator.config.to_json_file(str(extras / GENERATOR_CONFIG))
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()
             if not key.startswith("discriminator.")}
    save_file(state, str(extras / WEIGHTS))


def load(folder: Path) -> Electra:
    """An ELECTRA pretrained folder (``save``'s layout) back as the training module, on the CPU, eager attention."""
    extras = folder / EXTRAS
    if not (extras / WEIGHTS).is_file():
        raise InputError(f"{folder}: pretrained with objective electra but {extras / WEIGHTS} is missing; "
                         "re-run `bertflow pretrain`")
    from transformers import AutoConfig

    architecture = architectures.architecture_of(AutoConfig.from_pretrained(str(folder)).model_type, str(folder))
    encoder = architectures.encoder_class(architecture)
    discriminator = encoder.from_pretrained(str(folder), add_pooling_layer=False)
    small = architectures.config_class(architecture).from_json_file(str(extras / GENERATOR_CONFIG))
    model = Electra(discriminator, encoder(small, add_pooling_layer=False))
    missing, unexpected = model.load_state_dict(load_file(str(extras / WEIGHTS)), strict=False)
    broken = [key for key in missing if not key.startswith("discriminator.")] + list(unexpected)
    if broken:
        raise InputError(f"{extras / WEIGHTS}: does not fit the generator of {folder} ({', '.join(broken[:5])})")
    for part in (model.discriminator, model.generator):
        architectures.set_attention(part, "eager")
    return model.eval()
