"""BERT's masked-LM masking (80 % [MASK], 10 % random, 10 % kept; optional whole-word masking).

Pure: token ids in, masked ids and labels out, with an explicit ``random.Random``. ``mask_tokens`` is the one
masking function: stage pretrain_data uses it for static masks, the pretraining batches for dynamic ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from bertflow.params import PretrainDataParams


@dataclass(frozen=True)
class MaskingSpec:
    mask_token_id: int
    special_ids: frozenset[int]
    random_ids: tuple[int, ...]  # replacement candidates for the 10 % "random token" case
    masked_lm_prob: float
    max_predictions_per_seq: int
    is_continuation: tuple[bool, ...] | None = None  # per vocabulary id; set for whole-word masking


def masking_spec(tokenizer, params: PretrainDataParams) -> MaskingSpec:
    special = frozenset(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    continuation = None
    if params.do_whole_word_mask:
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        continuation = tuple(token.startswith("##") for token, _ in by_id)
    return MaskingSpec(
        mask_token_id=tokenizer.mask_token_id, special_ids=special,
        random_ids=tuple(i for i in sorted(vocab.values()) if i not in special),
        masked_lm_prob=params.masked_lm_prob, max_predictions_per_seq=params.max_predictions_per_seq,
        is_continuation=continuation)


def candidate_groups(input_ids: Sequence[int], spec: MaskingSpec) -> list[list[int]]:
    """Positions that may be masked, grouped by word when whole-word masking is on."""
    groups: list[list[int]] = []
    for i, token in enumerate(input_ids):
        if token in spec.special_ids:
            continue
        joins_word = (spec.is_continuation is not None and groups and groups[-1][-1] == i - 1
                      and spec.is_continuation[token])
        if joins_word:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def mask_tokens(input_ids: Sequence[int], spec: MaskingSpec,
                rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """BERT masking: returns (masked input ids, masked positions, original ids at those positions).

    ``masked_lm_prob`` of the non-special tokens (at least one, at most ``max_predictions_per_seq``)
    are chosen; of those 80 % become [MASK], 10 % a random non-special token, 10 % stay unchanged.
    """
    groups = candidate_groups(input_ids, spec)
    num_candidates = sum(len(group) for group in groups)
    num_to_predict = min(spec.max_predictions_per_seq, max(1, round(num_candidates * spec.masked_lm_prob)))
    rng.shuffle(groups)
    covered: list[int] = []
    for group in groups:
        if len(covered) >= num_to_predict:
            break
        if len(covered) + len(group) <= num_to_predict:
            covered.extend(group)
    output = list(input_ids)
    for index in covered:
        draw = rng.random()
        if draw < 0.8:
            output[index] = spec.mask_token_id
        elif draw >= 0.9:
            output[index] = rng.choice(spec.random_ids)
    positions = sorted(covered)
    return output, positions, [input_ids[p] for p in positions]
