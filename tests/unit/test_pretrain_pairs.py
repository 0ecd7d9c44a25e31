"""NSP pairs and MLM masking: known answers and statistical properties under a fixed seed."""

import random

import pytest

from bertflow.masking import MaskingSpec, candidate_groups, mask_tokens
from bertflow.pairs import PairSpec, create_instances_from_document, truncate_pair
from tasks.pretrain_data import plan_units

CLS, SEP, MASK, PAD, UNK = 2, 3, 4, 0, 1
SPECIAL = frozenset({PAD, UNK, CLS, SEP, MASK})
VOCAB = 5000
SPEC = MaskingSpec(MASK, SPECIAL, tuple(range(5, VOCAB)), masked_lm_prob=0.15, max_predictions_per_seq=20)


def synthetic_documents(rng: random.Random, count: int = 400) -> list[list[list[int]]]:
    """Documents whose tokens identify them: document d uses ids d*10+5 .. d*10+14."""
    return [[[d * 10 + 5 + rng.randrange(10) for _ in range(rng.randint(3, 25))]
             for _ in range(rng.randint(1, 30))] for d in range(count)]


def test_truncate_pair_trims_the_longer_side_to_fit():
    a, b = list(range(10)), list(range(100, 103))
    truncate_pair(a, b, 8, random.Random(0))
    assert len(a) + len(b) == 8 and len(b) == 3 and set(a) <= set(range(10))


def test_known_pair_layout():
    documents = [[[10, 11], [12, 13, 14]], [[20, 21, 22]]]
    spec = PairSpec(CLS, SEP, max_seq_length=64, short_seq_prob=0.0)
    for seed in range(20):
        for inst in create_instances_from_document(documents, 0, spec, random.Random(seed)):
            sep = inst.input_ids.index(SEP)
            a, b = inst.input_ids[1:sep], inst.input_ids[sep + 1:-1]
            assert inst.input_ids[0] == CLS and inst.input_ids[-1] == SEP
            assert inst.token_type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)
            if inst.is_random_next:
                assert set(b) <= {20, 21, 22}
            else:  # A then B is a contiguous run of document 0
                flat = [10, 11, 12, 13, 14]
                start = flat.index(a[0])
                assert a + b == flat[start:start + len(a) + len(b)]


@pytest.fixture(scope="module")
def instances():
    rng = random.Random(1234)
    documents = synthetic_documents(rng)
    spec = PairSpec(CLS, SEP, max_seq_length=48, short_seq_prob=0.1)
    out = []
    for index in range(len(documents)):
        out += [(index, inst) for inst in create_instances_from_document(documents, index, spec, rng)]
    return out


def test_nsp_positives_are_half(instances):
    assert len(instances) > 1500
    positives = sum(not inst.is_random_next for _, inst in instances) / len(instances)
    assert abs(positives - 0.5) <= 0.03


def test_random_next_comes_from_another_document_and_fits(instances):
    for index, inst in instances:
        assert len(inst.input_ids) <= 48
        sep = inst.input_ids.index(SEP)
        b_docs = {(t - 5) // 10 for t in inst.input_ids[sep + 1:-1]}
        a_docs = {(t - 5) // 10 for t in inst.input_ids[1:sep]}
        assert a_docs == {index}
        assert (index not in b_docs) if inst.is_random_next else (b_docs == {index})


def test_masking_rates_and_split(instances):
    rng = random.Random(99)
    maskable = masked = 0
    kinds = {"mask": 0, "random": 0, "self": 0}
    for _, inst in instances:
        out, positions, labels = mask_tokens(inst.input_ids, SPEC, rng)
        assert all(inst.input_ids[p] not in SPECIAL for p in positions)
        assert labels == [inst.input_ids[p] for p in positions]
        assert len(positions) <= SPEC.max_predictions_per_seq
        assert [t for i, t in enumerate(out) if i not in positions] == \
               [t for i, t in enumerate(inst.input_ids) if i not in positions]
        maskable += sum(t not in SPECIAL for t in inst.input_ids)
        masked += len(positions)
        for p in positions:
            kinds["mask" if out[p] == MASK else "self" if out[p] == inst.input_ids[p] else "random"] += 1
            assert out[p] == MASK or out[p] not in SPECIAL
    assert abs(masked / maskable - 0.15) <= 0.01
    assert abs(kinds["mask"] / masked - 0.8) <= 0.03
    assert abs(kinds["random"] / masked - 0.1) <= 0.03
    assert abs(kinds["self"] / masked - 0.1) <= 0.03


def test_masking_is_deterministic_under_a_seed():
    ids = [CLS] + list(range(5, 60)) + [SEP]
    assert mask_tokens(ids, SPEC, random.Random(7)) == mask_tokens(ids, SPEC, random.Random(7))


def test_whole_word_masking_masks_whole_words():
    continuation = tuple(i % 3 != 0 for i in range(VOCAB))  # ids divisible by 3 start words
    spec = MaskingSpec(MASK, SPECIAL, tuple(range(5, VOCAB)), 0.3, 50, is_continuation=continuation)
    ids = [CLS, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, SEP]
    assert candidate_groups(ids, spec) == [[1, 2, 3], [4, 5], [6, 7, 8], [9, 10, 11]]
    for seed in range(30):
        _, positions, _ = mask_tokens(ids, spec, random.Random(seed))
        for group in candidate_groups(ids, spec):
            assert set(group) <= set(positions) or not set(group) & set(positions)


def test_units_cover_every_document_once_per_dupe_in_order():
    documents = [[f"doc {d} sentence {i}" for i in range(random.Random(d).randint(1, 6))] for d in range(40)]
    units = list(plan_units(iter(documents), "train", dupes=3, shard_tokens=40, static=True))
    assert [d for u in units for d in u.documents] == documents and len(units) > 5
    assert [u.chunk for u in units] == list(range(len(units))) and all(len(u.documents) >= 2 for u in units)
    names = {u.name(dupe) for u in units for dupe in range(u.dupes)}
    assert len(names) == 3 * len(units)


def test_class_weights_are_inverse_frequency():
    from bertflow.classification import class_weights

    assert class_weights([0, 0, 0, 1], 2).tolist() == pytest.approx([4 / 6, 2.0])


def test_epoch_order_groups_similar_lengths_and_covers_full_batches():
    from bertflow.training import epoch_order

    lengths = [random.Random(i).randint(3, 60) for i in range(1000)]
    order = epoch_order(lengths, batch_size=10, seed=1, epoch=0, pool=5)
    assert len(order) == len(set(order)) and len(order) % 10 == 0 and len(order) >= 950
    spread = sum(max(lengths[i] for i in order[k:k + 10]) - min(lengths[i] for i in order[k:k + 10])
                 for k in range(0, len(order), 10)) / (len(order) / 10)
    assert spread < 15  # unsorted batches of 10 would spread by about 45
    assert order == epoch_order(lengths, 10, 1, 0, 5) and order != epoch_order(lengths, 10, 1, 1, 5)
