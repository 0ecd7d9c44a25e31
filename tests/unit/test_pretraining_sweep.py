"""The pretraining sweep's bookkeeping (benchmarks/pretraining_sweep.py): a recipe's record is found again by the
hash of the params its figures depend on; a setting added later at its neutral value leaves old records valid."""

import json

from benchmarks.pretraining_sweep import PROBE, RECIPES, recipe_params, record_hash, table
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


def test_the_table_compares_each_recipe_with_the_base_and_with_the_profiles_own_recipe():
    def record(name: str, flags: list[str]) -> dict:
        accuracy = [run.count("1") / len(run) for run in flags]
        gain = {"classifier_accuracy_by_seed": accuracy, "classifier_accuracy": sum(accuracy) / len(accuracy),
                "other_accuracy": 0.5, "gain": 0.0, "gain_interval": {"lower": 0.0, "upper": 0.0}, "p_value": 1.0}
        return {"recipe": name, "pretrain": {"tokens": 1}, "pretraining_gain": gain,
                "correct_by_seed": {"pretrained": flags}}

    base, default, other = (record("base", ["0" * 40, "0" * 40]), record("own", ["1" * 40, "1" * 40]),
                            record("other", ["1" * 20 + "0" * 20] * 2))
    rows = table([base, default, other], default_name="own")
    assert rows[0].endswith("| vs base, 95 % interval (p) | vs own, 95 % interval (p) |")
    assert rows[1].count("---") == len(rows[0].split("|")) - 2
    cells = [row.removesuffix(" |").split(" | ")[-2:] for row in rows[2:]]
    assert cells[0][0] == "–" and cells[1][1] == "–"  # nobody against itself
    assert cells[1][0].startswith("+100.00") and cells[2][0].startswith("+50.00")  # right where base is wrong
    assert cells[0][1].startswith("-100.00") and cells[2][1].startswith("-50.00")
    assert len(table([base, other])[0].split("|")) == len(rows[0].split("|")) - 1  # no profile recipe: no column
