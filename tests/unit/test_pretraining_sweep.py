"""The pretraining sweep's bookkeeping (benchmarks/pretraining_sweep.py): a recipe's record is found again by the
hash of the params its figures depend on; a setting added later at its neutral value leaves old records valid."""

import json

from benchmarks.pretraining_sweep import PROBE, RECIPES, recipe_params, record_hash
from tests.conftest import REPO


def params_of(overrides: dict) -> dict:
    return recipe_params(REPO / "params.yaml", overrides, {"finetune.seeds": 3, **PROBE})


def test_every_recipe_is_valid_params_and_each_has_its_own_hash():
    recipes = json.loads(RECIPES.read_text())
    hashes = {record_hash(params_of(overrides)) for overrides in recipes.values()}
    assert len(hashes) == len(recipes)


def test_a_neutral_new_setting_keeps_the_hash_and_any_other_value_changes_it():
    params = params_of({})
    older = json.loads(json.dumps(params))
    del older["pretrain"]["embedding_init_std"]  # as recorded before the setting existed
    assert params["pretrain"]["embedding_init_std"] is None
    assert record_hash(params) == record_hash(older)
    assert record_hash(params_of({"pretrain.embedding_init_std": 0.1})) != record_hash(params)
    assert record_hash(params_of({"evaluate.tfidf_baseline": False})) != record_hash(params)
