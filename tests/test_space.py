"""Study files: the shipped ones load, malformed ones fail with the key named, trial configs are
validated TrainConfigs, and suggestions honour bounds, conditions and scaling. No Ray."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from adadpigu.config import ConfigError, Method, NormalisationKind, TrainConfig
from study.space import (
    Group,
    ParamKind,
    SamplerKind,
    StudyError,
    TrialCountKind,
    enqueued_points,
    load_study,
    parse_study,
    suggest,
    trial_config,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))

VALID: dict[str, Any] = {
    "methods": ["adadpigu", "dpsgd"],
    "budgets": {"epsilon": [1, 4], "delta": 1e-5},
    "base": {
        "data": {"name": "synthetic", "synthetic_size": 512, "validation_size": 64},
        "model": {"name": "mlp"},
        "training": {"epochs": 1, "batch_size": 64, "lr": 1.0},
    },
    "space": {
        "training.lr": {"type": "float", "low": 0.1, "high": 4.0, "log": True},
        "adadpigu.keep_ratio": {"type": "float", "low": 0.3, "high": 1.0},
        "adadpigu.normalisation": {"type": "categorical", "choices": ["adaclip", "off"]},
    },
    "trials": 2,
}


def variant(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        node = raw
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return raw


DELETE = object()


def test_shipped_study_files_load() -> None:
    names = {p.name for p in SHIPPED}
    assert {"mnist_quick.yaml", "mnist_full.yaml", "fashion_mnist.yaml", "cifar10.yaml"} <= names
    for path in SHIPPED:
        spec = load_study(path)
        assert spec.groups(), path


WITH_ADADPIGU = [p for p in SHIPPED if Method.ADADPIGU in load_study(p).methods]


def test_every_shipped_study_compares_adadpigu() -> None:
    assert WITH_ADADPIGU == SHIPPED


@pytest.mark.parametrize("path", WITH_ADADPIGU, ids=lambda p: p.name)
def test_shipped_spaces_keep_the_plain_dpsgd_corner(path: Path) -> None:
    """AdaDPIGU's space reaches ρ = 1 with normalisation off (stage 2 = plain DP-SGD)."""
    spec = load_study(path)
    params = {p.key: p for p in spec.space_for(Method.ADADPIGU)}
    keep = params["adadpigu.keep_ratio"]
    assert keep.kind is ParamKind.FLOAT and keep.high == 1.0
    norm = params.get("adadpigu.normalisation")
    base_norm = TrainConfig.from_dict(spec.base).adadpigu.normalisation
    assert (norm is not None and "off" in norm.choices) or base_norm is NormalisationKind.OFF


def test_valid_study_parses() -> None:
    spec = parse_study(VALID)
    assert [g.name for g in spec.groups()] == [
        "adadpigu-eps1",
        "adadpigu-eps4",
        "dpsgd-eps1",
        "dpsgd-eps4",
    ]
    # AdaDPIGU's settings are searched only for AdaDPIGU.
    assert spec.searched_keys(Method.DPSGD) == {"training.lr"}
    assert spec.searched_keys(Method.ADADPIGU) == {
        "training.lr",
        "adadpigu.keep_ratio",
        "adadpigu.normalisation",
    }
    assert spec.trials.kind is TrialCountKind.FIXED and spec.trials.count == 2
    assert spec.search.sampler is SamplerKind.TPE


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        (variant(colour="blue"), "colour", "unknown key"),
        (variant(budgets__epsilon=[1, 0]), "budgets.epsilon[1]", "> 0"),
        (variant(budgets__epsilon=[-2]), "budgets.epsilon[0]", "> 0"),
        (variant(methods=[]), "methods", "non-empty"),
        (variant(methods=["dpsgd", "sgd"]), "methods[1]", "allowed"),
        (
            variant(**{"space__adadpigu.keep_ratio": {"type": "float", "low": 0.3, "high": 1.5}}),
            "space.adadpigu.keep_ratio.high",
            "(0, 1]",
        ),
        (
            variant(**{"space__training.lr": {"type": "float", "low": 0.1, "high": 4, "lg": True}}),
            "space.training.lr.lg",
            "unknown key",
        ),
        (
            variant(**{"space__adadpigu.keep_ratoi": {"type": "float", "low": 0.3, "high": 1.0}}),
            "space.adadpigu.keep_ratoi",
            "unknown config key",
        ),
        (
            variant(
                **{"space__privacy.noise_multiplier": {"type": "float", "low": 0.5, "high": 2}}
            ),
            "space.privacy.noise_multiplier",
            "never set or searched",
        ),
        (
            variant(**{"space__training.batch_size": {"type": "float", "low": 32, "high": 64}}),
            "space.training.batch_size.type",
            "use type int",
        ),
        (variant(base__privacy={"epsilon": 3.0}), "base.privacy.epsilon", "budgets.epsilon"),
        (variant(base__training={"lr": -1}), "base.training.lr", "> 0"),
        (variant(base__trainign={}), "base.trainign", "unknown key"),
        (
            variant(**{"space__adadpigu": {"keep_ratio": {"type": "float", "low": 0, "high": 1}}}),
            "space.adadpigu",
            "is a section",
        ),
        (variant(trials=0), "trials", ">= 1"),
        (variant(trials={"distribution": "poisson", "mean": 0.5}), "trials.mean", ">= 1"),
        (variant(budgets__delta=2), "budgets.delta", "(0, 1/N)"),
        (variant(search={"sampler": "grid"}), "search.sampler", "tpe, random"),
        (
            variant(search={"enqueue": [{"training.momentum": 0.5}]}),
            "search.enqueue[0].training.momentum",
            "not a key of the search space",
        ),
        (
            variant(search={"enqueue": [{"training.lr": 9.0}]}),
            "search.enqueue[0].training.lr",
            "outside its space",
        ),
    ],
)
def test_malformed_study_names_the_key(raw: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(StudyError) as info:
        parse_study(raw)
    assert info.value.key == key, str(info.value)
    assert fragment in str(info.value)


def test_space_keys_spelled_with_dots_in_the_variant_helper() -> None:
    # The helper addresses nested YAML with "__"; dotted space keys stay whole.
    raw = variant(**{"space__adadpigu.keep_ratio": {"type": "float", "low": 0.3, "high": 1.5}})
    with pytest.raises(StudyError, match=r"space\.adadpigu\.keep_ratio\.high: got 1\.5"):
        parse_study(raw)


def test_method_space_rejects_settings_that_do_not_apply() -> None:
    raw = variant(
        method_space={"dpsgd": {"adadpigu.keep_ratio": {"type": "float", "low": 0.3, "high": 1}}}
    )
    with pytest.raises(StudyError, match="does not affect method dpsgd"):
        parse_study(raw)


def test_early_stopping_needs_one_seed() -> None:
    raw = variant(seeds=[0, 1], search={"early_stopping": {"scheduler": "asha"}})
    with pytest.raises(StudyError) as info:
        parse_study(raw)
    assert info.value.key == "search.early_stopping"


def test_tuning_within_budget_requires_its_conditions() -> None:
    with pytest.raises(StudyError, match="sampler: random"):
        parse_study(variant(tuning_within_budget=True))
    ok = variant(
        tuning_within_budget=True,
        search={"sampler": "random"},
        trials={"distribution": "poisson", "mean": 3},
    )
    assert parse_study(ok).tuning_within_budget
    searched_epochs = copy.deepcopy(ok)
    searched_epochs["space"]["training.epochs"] = {"type": "int", "low": 1, "high": 3}
    with pytest.raises(StudyError, match="epochs and batch size fixed"):
        parse_study(searched_epochs)


def test_trial_config_is_a_validated_config_calibrated_to_the_group() -> None:
    spec = parse_study(VALID)
    group = Group(Method.ADADPIGU, 4.0)
    config = trial_config(spec, group, {"adadpigu.keep_ratio": 0.5, "training.lr": 2.0}, seed=3)
    assert config.method is Method.ADADPIGU
    assert config.seed == 3
    assert config.privacy.epsilon == 4.0 and config.privacy.noise_multiplier is None
    assert config.privacy.delta == 1e-5
    assert config.adadpigu.keep_ratio == 0.5 and config.training.lr == 2.0
    tuned = trial_config(spec, group, {}, seed=0, noise_multiplier=1.7, threads=1)
    assert tuned.privacy.epsilon is None and tuned.privacy.noise_multiplier == 1.7
    assert tuned.runtime.threads == 1
    with pytest.raises(ConfigError, match=r"adadpigu\.keep_ratio"):
        trial_config(spec, group, {"adadpigu.keep_ratio": 1.5}, seed=0)


class LowTrial:
    """A stand-in for optuna.Trial that always suggests the lower bound / first choice."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def suggest_float(self, name: str, low: float, high: float, *, step=None, log=False) -> float:
        self.asked.append(name)
        return low

    def suggest_int(self, name: str, low: int, high: int, *, step=1, log=False) -> int:
        self.asked.append(name)
        return low

    def suggest_categorical(self, name: str, choices: list) -> Any:
        self.asked.append(name)
        return choices[0]


def test_suggest_honours_conditions_and_scaling() -> None:
    raw = variant(
        space={
            "adadpigu.clip.schedule": {"type": "categorical", "choices": ["exp_decay", "constant"]},
            "adadpigu.clip.c0": {"type": "float", "low": 2.0, "high": 4.0},
            "adadpigu.clip.c_final": {
                "type": "float",
                "low": 0.25,
                "high": 1.0,
                "scale_by": "adadpigu.clip.c0",
                "when": {"adadpigu.clip.schedule": ["exp_decay", "linear_decay"]},
            },
            "adadpigu.clip.target_quantile": {
                "type": "float",
                "low": 0.3,
                "high": 0.7,
                "when": {"adadpigu.clip.schedule": "quantile"},
            },
        }
    )
    spec = parse_study(raw)
    trial = LowTrial()
    values = suggest(spec.space_for(Method.ADADPIGU), trial, base=spec.base)
    assert values == {
        "adadpigu.clip.schedule": "exp_decay",
        "adadpigu.clip.c0": 2.0,
        "adadpigu.clip.c_final": 0.5,  # 0.25 × c0
    }
    assert "adadpigu.clip.target_quantile" not in trial.asked
    config = trial_config(spec, Group(Method.ADADPIGU, 1.0), values, seed=0)
    assert config.adadpigu.clip.c_final == 0.5


def test_suggest_with_real_optuna_stays_in_bounds() -> None:
    spec = parse_study(VALID)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    for _ in range(20):
        trial = study.ask()
        values = suggest(spec.space_for(Method.ADADPIGU), trial, base=spec.base)
        assert 0.1 <= values["training.lr"] <= 4.0
        assert 0.3 <= values["adadpigu.keep_ratio"] <= 1.0
        assert values["adadpigu.normalisation"] in ("adaclip", "off")
        trial_config(spec, Group(Method.ADADPIGU, 1.0), values, seed=0)
        study.tell(trial, 0.5)


def test_load_study_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert load_study(path).epsilons == (1.0, 4.0)
    path.write_text("methods: [dpsgd\n")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(path)


def test_poisson_trial_count_has_infinite_shape() -> None:
    spec = parse_study(variant(trials={"distribution": "poisson", "mean": 4}))
    assert spec.trials.kind is TrialCountKind.POISSON and math.isinf(spec.trials.shape)
    assert spec.trials.describe() == "poisson(mean=4)"


def test_enqueued_points_apply_per_method() -> None:
    raw = variant(
        method_space={"dpsgd": {"training.lr": {"type": "float", "low": 0.01, "high": 0.5}}},
        search={
            "enqueue": [{"training.lr": 2.0, "adadpigu.keep_ratio": 0.6}, {"training.lr": 0.1}]
        },
    )
    spec = parse_study(raw)
    assert enqueued_points(spec, Method.ADADPIGU) == [
        {"training.lr": 2.0, "adadpigu.keep_ratio": 0.6},
        {"training.lr": 0.1},
    ]
    # DP-SGD's own range excludes lr 2.0 and it has no keep ratio.
    assert enqueued_points(spec, Method.DPSGD) == [{"training.lr": 0.1}]
