"""Configuration loading: TOML, environment overrides, and errors naming the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import ModelSection, PlanSection, load_aggregator_config
from clinic_agent.dp_training import check_dp_compatible
from clinic_agent.privacy import PrivacyConfig
from common.errors import ConfigError
from common.model import DP_ARCH, RECIPE_PLANS, build_model, trainable_part


def write(tmp_path: Path, body: str) -> Path:
    for name in ("ca.crt", "agg.crt", "agg.key"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "aggregator.toml"
    path.write_text(body)
    return path


GOOD = """
federation = "fed"
[tls]
ca_cert = "ca.crt"
cert = "agg.crt"
key = "agg.key"
[storage]
state_dir = "state"
[rounds]
min_clinics = 2
"""


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_aggregator_config(write(tmp_path, GOOD), env={})
    assert cfg.tls.cert == tmp_path / "agg.crt"
    assert cfg.storage.state_dir == tmp_path / "state"
    assert cfg.rounds.min_clinics == 2 and cfg.plan.local_epochs == 1


def test_environment_overrides_use_double_underscores(tmp_path):
    env = {
        "DERMAFED__ROUNDS__MIN_CLINICS": "3",
        "DERMAFED__PLAN__LEARNING_RATE": "0.5",
        "DERMAFED__LOGGING__JSON": "true",
    }
    cfg = load_aggregator_config(write(tmp_path, GOOD + "max_cohort = 9\n"), env=env)
    assert cfg.rounds.min_clinics == 3 and cfg.plan.learning_rate == 0.5 and cfg.logging.json


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (GOOD + "min_clinicz = 2\n", "rounds.min_clinicz"),
        (GOOD + "aggregation = 'sideways'\n", "rounds.aggregation"),
        (GOOD.replace("min_clinics = 2", "min_clinics = 'two'"), "rounds.min_clinics"),
        (GOOD.replace("min_clinics = 2", "min_clinics = 0"), "rounds.min_clinics"),
        (GOOD.replace('key = "agg.key"', 'key = "missing.key"'), "tls.key"),
        (GOOD.replace('federation = "fed"', ""), "federation"),
        (GOOD + "[server]\nlisten = 'nohost'\n", "server.listen"),
        (GOOD + "[plan]\noptimizer = 'lbfgs'\n", "plan.optimizer"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path, body, key):
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(write(tmp_path, body), env={})
    assert str(err.value).startswith(key)


def test_invalid_toml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_aggregator_config(write(tmp_path, "federation = \n"), env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_aggregator_config(tmp_path / "nope.toml", env={})


def test_bad_environment_override_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^rounds\.max_rounds"):
        load_aggregator_config(write(tmp_path, GOOD), env={"DERMAFED__ROUNDS__MAX_ROUNDS": "lots"})


def test_default_model_and_plan_are_the_dp_recipe_that_clinics_train_by_default():
    assert PrivacyConfig().mode == "dp-sgd"
    recipe = RECIPE_PLANS[DP_ARCH]
    model, plan = ModelSection(), PlanSection()
    assert (model.arch, model.input_size) == (DP_ARCH, recipe.input_size)
    assert (plan.learning_rate, plan.batch_size) == (recipe.learning_rate, recipe.batch_size)
    # The default model trains under DP-SGD: only its head is trainable, no BatchNorm.
    check_dp_compatible(trainable_part(build_model(model.to_model_config())))
