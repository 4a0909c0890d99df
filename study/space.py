"""Study files (search_spaces/*.yaml): the schema, its validation, and the trial configs it yields.

A study compares methods at fixed privacy budgets. Its file names the methods, the ε budgets (with
one δ), a `base` run config (a `TrainConfig` mapping without method, seed, ε, δ or σ, which the
study sets), the search space as dotted config keys, how many trials each (method, ε) gets, the
seeds, the search settings and the resources of a trial. Every trial config is `base` + the
group's method and budget + the suggested values, validated by `TrainConfig.from_dict`. σ is never
searched: each trial is calibrated to its group's ε (or, with `tuning_within_budget`, to the ε of
the whole selection procedure).

Loading validates everything that can be checked without data or Ray, and raises `StudyError`
naming the offending key (`space.adadpigu.keep_ratio.high: got 1.5; allowed: (0, 1]`).

Search-space entries (under `space`, shared by all methods, or `method_space.<method>`):

    training.lr:            {type: float, low: 0.1, high: 4.0, log: true}
    training.batch_size:    {type: int, low: 64, high: 512, step: 64}
    adadpigu.importance:    {type: categorical, choices: [abs_sum, sq_debiased]}
    adadpigu.clip.c_final:  {type: float, low: 0.1, high: 1.0, scale_by: adadpigu.clip.c0,
                             when: {adadpigu.clip.schedule: [exp_decay, linear_decay]}}

`when` makes an entry conditional on values of earlier entries (or of the base config); `scale_by`
multiplies the suggested value by another setting's value (so c_final ≤ c0 holds by construction).
Shared entries apply only where they can matter: `adadpigu.*` to method adadpigu, `privacy.*` to the
private methods. This module imports neither Ray nor Optuna (`suggest` takes any object with
Optuna's `suggest_float` / `suggest_int` / `suggest_categorical`).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from adadpigu.config import ConfigError, Method, TrainConfig, lookup_key, set_key

__all__ = [
    "STUDY_FILE_VERSION",
    "EarlyStopping",
    "Group",
    "ParamKind",
    "ParamSpec",
    "Resources",
    "SamplerKind",
    "SearchSettings",
    "StudyError",
    "StudySpec",
    "TrialCount",
    "TrialCountKind",
    "enqueued_points",
    "load_study",
    "parse_study",
    "suggest",
    "trial_config",
]

#: Version of the study-file format this module reads (the optional top-level `version` key).
STUDY_FILE_VERSION = 1

_TOP_KEYS = (
    "version",
    "description",
    "methods",
    "budgets",
    "base",
    "space",
    "method_space",
    "trials",
    "seeds",
    "search",
    "resources",
    "tuning_within_budget",
)

# Settings the study itself decides; `base` must not set them, and they are never searched.
_STUDY_OWNED = {
    "method": "set by `methods`",
    "seed": "set by `seeds`",
    "privacy.epsilon": "set by `budgets.epsilon`",
    "privacy.delta": "set by `budgets.delta`",
    "privacy.noise_multiplier": "σ is derived from the ε budget by calibration, never set or searched",
}
# Prefixes that are not hyperparameters: the dataset, runtime settings and privacy bookkeeping.
_NOT_SEARCHABLE_PREFIXES = ("data.", "runtime.")
_NOT_SEARCHABLE = (
    "privacy.accountant",
    "privacy.noise_seed",
    "privacy.allow_overspend",
    "privacy.epsilon_tolerance",
    "model.name",
)
# Searching these makes q or T differ between trials (so trials are not one mechanism).
SAMPLING_KEYS = ("training.epochs", "training.batch_size", "training.sample_rate")


class StudyError(ValueError):
    """A study file is malformed; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class ParamKind(enum.StrEnum):
    FLOAT = "float"
    INT = "int"
    CATEGORICAL = "categorical"


class SamplerKind(enum.StrEnum):
    TPE = "tpe"
    RANDOM = "random"


class TrialCountKind(enum.StrEnum):
    FIXED = "fixed"
    POISSON = "poisson"
    TRUNCATED_NEGATIVE_BINOMIAL = "truncated_negative_binomial"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One search-space entry, addressed by its dotted config key."""

    key: str
    kind: ParamKind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    scale_by: str | None = None

    def probe_values(self) -> list[tuple[str, Any]]:
        """(where, value) pairs that span the entry: the bounds, or every choice."""
        if self.kind is ParamKind.CATEGORICAL:
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices)]
        return [("low", self.low), ("high", self.high)]

    def contains(self, value: Any) -> bool:
        """Whether `value` is a point of this entry (before any `scale_by`)."""
        if self.kind is ParamKind.CATEGORICAL:
            return value in self.choices
        if not _is_number(value):
            return False
        return self.low <= value <= self.high  # type: ignore[operator]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind.value}
        if self.kind is ParamKind.CATEGORICAL:
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high)
            if self.log:
                out["log"] = True
            if self.step is not None:
                out["step"] = self.step
        if self.when:
            out["when"] = {k: list(v) for k, v in self.when}
        if self.scale_by:
            out["scale_by"] = self.scale_by
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialCount:
    """Trials per (method, ε): a fixed count, or a distribution the count is drawn from once.

    `shape` follows Papernot & Steinke (2022) / dp-accounting: `math.inf` Poisson, 1 geometric,
    0 logarithmic, (0, inf) truncated negative binomial. `draw_seed` fixes the draw (tests): the
    count is then predictable, so the selection-procedure ε is not claimed.
    """

    kind: TrialCountKind
    count: int | None = None
    mean: float | None = None
    shape: float | None = None
    draw_seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.kind is not TrialCountKind.FIXED

    def describe(self) -> str:
        if self.kind is TrialCountKind.FIXED:
            return f"fixed({self.count})"
        if self.kind is TrialCountKind.POISSON:
            return f"poisson(mean={self.mean:g})"
        return f"truncated_negative_binomial(mean={self.mean:g}, shape={self.shape:g})"

    def to_dict(self) -> dict[str, Any]:
        if self.kind is TrialCountKind.FIXED:
            return {"distribution": "fixed", "count": self.count}
        out: dict[str, Any] = {"distribution": self.kind.value, "mean": self.mean}
        if self.kind is TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL:
            out["shape"] = self.shape
        if self.draw_seed is not None:
            out["draw_seed"] = self.draw_seed
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """ASHA on validation accuracy, with whole epochs as its time unit."""

    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings:
    sampler: SamplerKind = SamplerKind.TPE
    seed: int = 0
    max_concurrent_trials: int | None = None
    early_stopping: EarlyStopping | None = None
    # Points evaluated first (Optuna enqueue_trial), e.g. the paper's defaults.
    enqueue: tuple[Mapping[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resources:
    """What one trial takes. `workers` > 1 runs it through Ray Train (study.distributed)."""

    workers: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_worker: float = 0.0
    num_cpus: int | None = None  # a local Ray's CPU count (default: this machine's)


@dataclasses.dataclass(frozen=True)
class Group:
    """One (method, ε) cell of a study: one Optuna study, one trial count, one selection."""

    method: Method
    epsilon: float | None  # None for the non-private reference

    @property
    def name(self) -> str:
        if self.epsilon is None:
            return self.method.value
        return f"{self.method.value}-eps{self.epsilon:g}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudySpec:
    description: str
    methods: tuple[Method, ...]
    epsilons: tuple[float, ...]
    delta: float
    base: Mapping[str, Any]
    spaces: Mapping[Method, tuple[ParamSpec, ...]]
    trials: TrialCount
    seeds: tuple[int, ...]
    search: SearchSettings
    resources: Resources
    tuning_within_budget: bool

    def groups(self) -> list[Group]:
        out: list[Group] = []
        for method in self.methods:
            if method.is_private:
                out.extend(Group(method, eps) for eps in self.epsilons)
            else:
                out.append(Group(method, None))
        return out

    def group(self, name: str) -> Group:
        for group in self.groups():
            if group.name == name:
                return group
        raise KeyError(name)

    def space_for(self, method: Method) -> tuple[ParamSpec, ...]:
        return self.spaces.get(method, ())

    def searched_keys(self, method: Method) -> set[str]:
        return {p.key for p in self.space_for(method)}

    def max_epochs(self, method: Method) -> float:
        """The most epochs a trial of `method` can run (ASHA's horizon)."""
        for param in self.space_for(method):
            if param.key == "training.epochs":
                if param.kind is ParamKind.CATEGORICAL:
                    return float(max(param.choices))
                return float(param.high)  # type: ignore[arg-type]
        return float(lookup_key(_defaults_with(self.base), "training.epochs"))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file. Raises `StudyError` (naming the key) or FileNotFoundError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(str(path), f"not valid YAML: {exc}") from None
    return parse_study(raw)


def parse_study(raw: Any) -> StudySpec:
    """Validate a parsed study mapping into a `StudySpec`."""
    if not isinstance(raw, Mapping):
        raise StudyError("study", f"expected a mapping at the top level, got {type(raw).__name__}")
    _reject_unknown(raw, _TOP_KEYS, prefix="")
    version = raw.get("version", STUDY_FILE_VERSION)
    if version != STUDY_FILE_VERSION:
        raise StudyError("version", f"got {version!r}; allowed: {STUDY_FILE_VERSION}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise StudyError("description", f"got {description!r}; allowed: a string")

    methods = _parse_methods(raw.get("methods"))
    epsilons, delta = _parse_budgets(raw.get("budgets"), methods)
    base = _parse_base(raw.get("base"))
    trials = _parse_trials(raw.get("trials"))
    seeds = _parse_seeds(raw.get("seeds", [0]))
    search = _parse_search(raw.get("search"))
    resources = _parse_resources(raw.get("resources"))
    tuning = raw.get("tuning_within_budget", False)
    if not isinstance(tuning, bool):
        raise StudyError("tuning_within_budget", f"got {tuning!r}; allowed: true or false")

    shared = _parse_space(raw.get("space"), prefix="space")
    per_method_raw = raw.get("method_space") or {}
    if not isinstance(per_method_raw, Mapping):
        raise StudyError("method_space", "expected a mapping of method → search space")
    spaces: dict[Method, tuple[ParamSpec, ...]] = {}
    for name in per_method_raw:
        method = _enum(Method, name, f"method_space.{name}")
        if method not in methods:
            raise StudyError(
                f"method_space.{name}",
                f"method {name} is not in methods {[m.value for m in methods]}",
            )
    for method in methods:
        own = _parse_space(
            per_method_raw.get(method.value), prefix=f"method_space.{method.value}", method=method
        )
        merged = {p.key: p for p in shared if _applies(p.key, method)}
        merged.update({p.key: p for p in own})
        spaces[method] = tuple(merged.values())

    spec = StudySpec(
        description=description,
        methods=methods,
        epsilons=epsilons,
        delta=delta,
        base=base,
        spaces=spaces,
        trials=trials,
        seeds=seeds,
        search=search,
        resources=resources,
        tuning_within_budget=tuning,
    )
    _check_against_config(spec, shared_keys={p.key for p in shared})
    _check_enqueue(spec)
    _check_combinations(spec)
    return spec


def _reject_unknown(raw: Mapping[str, Any], allowed: Sequence[str], *, prefix: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise StudyError(key, f"unknown key; allowed keys here: {', '.join(allowed)}")


def _enum(kind: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise StudyError(key, f"got {value!r}; allowed: {allowed}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _parse_methods(raw: Any) -> tuple[Method, ...]:
    if not isinstance(raw, list) or not raw:
        raise StudyError(
            "methods",
            f"got {raw!r}; allowed: a non-empty list of {', '.join(m.value for m in Method)}",
        )
    methods = tuple(_enum(Method, m, f"methods[{i}]") for i, m in enumerate(raw))
    if len(set(methods)) != len(methods):
        raise StudyError("methods", f"got {raw!r}; each method at most once")
    return methods


def _parse_budgets(raw: Any, methods: tuple[Method, ...]) -> tuple[tuple[float, ...], float]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise StudyError("budgets", "expected a mapping with keys epsilon (a list) and delta")
    _reject_unknown(raw, ("epsilon", "delta"), prefix="budgets")
    eps_raw = raw.get("epsilon", [])
    if not isinstance(eps_raw, list):
        raise StudyError("budgets.epsilon", f"got {eps_raw!r}; allowed: a list of numbers > 0")
    epsilons: list[float] = []
    for i, eps in enumerate(eps_raw):
        if not _is_number(eps) or not math.isfinite(eps) or eps <= 0:
            raise StudyError(f"budgets.epsilon[{i}]", f"got {eps!r}; allowed: a number > 0")
        epsilons.append(float(eps))
    if len(set(epsilons)) != len(epsilons):
        raise StudyError("budgets.epsilon", f"got {eps_raw!r}; each budget at most once")
    if any(m.is_private for m in methods) and not epsilons:
        raise StudyError("budgets.epsilon", "private methods need at least one ε budget")
    delta = raw.get("delta", 1e-5)
    if not _is_number(delta) or not 0 < delta < 1:
        raise StudyError("budgets.delta", f"got {delta!r}; allowed: (0, 1/N)")
    return tuple(epsilons), float(delta)


def _parse_base(raw: Any) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise StudyError("base", f"expected a run-config mapping, got {type(raw).__name__}")
    base = copy.deepcopy(dict(raw))
    for key, why in _STUDY_OWNED.items():
        if _has(base, key):
            raise StudyError(f"base.{key}", f"{why}; remove it from base")
    try:
        TrainConfig.from_dict(base)
    except ConfigError as exc:
        raise StudyError(f"base.{exc.field}", str(exc).split(": ", 1)[-1]) from None
    return base


def _parse_trials(raw: Any) -> TrialCount:
    from adadpigu.accounting import AccountingError, check_trial_distribution

    key = "trials"
    if raw is None:
        raise StudyError(key, "missing; give a count (e.g. 3) or {distribution: poisson, mean: 3}")
    if _is_int(raw):
        if raw < 1:
            raise StudyError(key, f"got {raw!r}; allowed: an integer >= 1")
        return TrialCount(kind=TrialCountKind.FIXED, count=int(raw))
    if not isinstance(raw, Mapping):
        raise StudyError(key, f"got {raw!r}; allowed: an integer >= 1 or a distribution mapping")
    _reject_unknown(raw, ("distribution", "count", "mean", "shape", "draw_seed"), prefix=key)
    kind = _enum(TrialCountKind, raw.get("distribution", "fixed"), f"{key}.distribution")
    if kind is TrialCountKind.FIXED:
        count = raw.get("count")
        if not _is_int(count) or count < 1:
            raise StudyError(f"{key}.count", f"got {count!r}; allowed: an integer >= 1")
        for extra in ("mean", "shape", "draw_seed"):
            if extra in raw:
                raise StudyError(f"{key}.{extra}", "only for a distribution (poisson, ...)")
        return TrialCount(kind=kind, count=int(count))
    if "count" in raw:
        raise StudyError(f"{key}.count", "a drawn count has a mean, not a count")
    mean = raw.get("mean")
    if kind is TrialCountKind.POISSON:
        if "shape" in raw:
            raise StudyError(f"{key}.shape", "poisson has no shape")
        shape = math.inf
    else:
        shape = raw.get("shape", 1)
    draw_seed = raw.get("draw_seed")
    if draw_seed is not None and not _is_int(draw_seed):
        raise StudyError(f"{key}.draw_seed", f"got {draw_seed!r}; allowed: an integer or null")
    if not _is_number(mean):
        raise StudyError(f"{key}.mean", f"got {mean!r}; allowed: a number >= 1")
    if not _is_number(shape):
        raise StudyError(f"{key}.shape", f"got {shape!r}; allowed: a number >= 0")
    try:
        check_trial_distribution(mean_trials=float(mean), shape=float(shape))
    except AccountingError as exc:
        field = "mean" if exc.field == "mean_trials" else "shape"
        raise StudyError(f"{key}.{field}", str(exc).split(": ", 1)[-1]) from None
    return TrialCount(kind=kind, mean=float(mean), shape=float(shape), draw_seed=draw_seed)


def _parse_seeds(raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw or not all(_is_int(s) and s >= 0 for s in raw):
        raise StudyError("seeds", f"got {raw!r}; allowed: a non-empty list of integers >= 0")
    if len(set(raw)) != len(raw):
        raise StudyError("seeds", f"got {raw!r}; each seed at most once")
    return tuple(int(s) for s in raw)


def _parse_search(raw: Any) -> SearchSettings:
    if raw is None:
        return SearchSettings()
    if not isinstance(raw, Mapping):
        raise StudyError("search", f"expected a mapping, got {type(raw).__name__}")
    _reject_unknown(
        raw,
        ("sampler", "seed", "max_concurrent_trials", "early_stopping", "enqueue"),
        prefix="search",
    )
    sampler = _enum(SamplerKind, raw.get("sampler", "tpe"), "search.sampler")
    seed = raw.get("seed", 0)
    if not _is_int(seed) or seed < 0:
        raise StudyError("search.seed", f"got {seed!r}; allowed: an integer >= 0")
    concurrent = raw.get("max_concurrent_trials")
    if concurrent is not None and (not _is_int(concurrent) or concurrent < 1):
        raise StudyError(
            "search.max_concurrent_trials", f"got {concurrent!r}; allowed: an integer >= 1 or null"
        )
    early = raw.get("early_stopping")
    stopping: EarlyStopping | None = None
    if early is not None and early is not False:
        if not isinstance(early, Mapping):
            raise StudyError("search.early_stopping", "expected {scheduler: asha, ...} or null")
        _reject_unknown(
            early, ("scheduler", "grace_period", "reduction_factor"), prefix="search.early_stopping"
        )
        if early.get("scheduler", "asha") != "asha":
            raise StudyError(
                "search.early_stopping.scheduler", f"got {early.get('scheduler')!r}; allowed: asha"
            )
        grace = early.get("grace_period", 1)
        if not _is_int(grace) or grace < 1:
            raise StudyError(
                "search.early_stopping.grace_period", f"got {grace!r}; allowed: an integer >= 1"
            )
        factor = early.get("reduction_factor", 2)
        if not _is_number(factor) or factor <= 1:
            raise StudyError(
                "search.early_stopping.reduction_factor", f"got {factor!r}; allowed: a number > 1"
            )
        stopping = EarlyStopping(grace_period=int(grace), reduction_factor=float(factor))
    enqueue = raw.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(p, Mapping) for p in enqueue):
        raise StudyError("search.enqueue", "expected a list of {dotted.key: value} mappings")
    return SearchSettings(
        sampler=sampler,
        seed=int(seed),
        max_concurrent_trials=concurrent,
        early_stopping=stopping,
        enqueue=tuple(dict(p) for p in enqueue),
    )


def _parse_resources(raw: Any) -> Resources:
    if raw is None:
        return Resources()
    if not isinstance(raw, Mapping):
        raise StudyError("resources", f"expected a mapping, got {type(raw).__name__}")
    _reject_unknown(
        raw, ("workers", "cpus_per_trial", "gpus_per_worker", "num_cpus"), prefix="resources"
    )
    workers = raw.get("workers", 1)
    if not _is_int(workers) or workers < 1:
        raise StudyError("resources.workers", f"got {workers!r}; allowed: an integer >= 1")
    cpus = raw.get("cpus_per_trial", 1)
    if not _is_number(cpus) or cpus <= 0:
        raise StudyError("resources.cpus_per_trial", f"got {cpus!r}; allowed: a number > 0")
    gpus = raw.get("gpus_per_worker", 0)
    if not _is_number(gpus) or gpus < 0:
        raise StudyError("resources.gpus_per_worker", f"got {gpus!r}; allowed: a number >= 0")
    num_cpus = raw.get("num_cpus")
    if num_cpus is not None and (not _is_int(num_cpus) or num_cpus < 1):
        raise StudyError(
            "resources.num_cpus", f"got {num_cpus!r}; allowed: an integer >= 1 or null"
        )
    return Resources(
        workers=int(workers),
        cpus_per_trial=float(cpus),
        gpus_per_worker=float(gpus),
        num_cpus=num_cpus,
    )


# --------------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------------


def _applies(key: str, method: Method) -> bool:
    """Whether a shared search entry can change a run of `method`."""
    if key.startswith("adadpigu."):
        return method is Method.ADADPIGU
    if key.startswith("privacy."):
        return method.is_private
    return True


def _field_hint(key: str, *, where: str) -> Any:
    """The annotation of a dotted TrainConfig setting; StudyError if unknown or a whole section."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            section = ".".join(parts[:i]) or "the config"
            raise StudyError(
                where, f"unknown config key {key!r}; allowed in {section}: {', '.join(hints)}"
            )
        hint = _strip_optional(hints[part])
        if dataclasses.is_dataclass(hint):
            if i == len(parts) - 1:
                raise StudyError(where, f"{key!r} is a section; address one of its settings")
            cls = hint
        elif i < len(parts) - 1:
            raise StudyError(
                where, f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a setting"
            )
        else:
            return hint
    raise AssertionError("unreachable")


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0]
    return hint


def _parse_space(raw: Any, *, prefix: str, method: Method | None = None) -> tuple[ParamSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise StudyError(prefix, "expected a mapping of dotted.config.key → {type: ..., ...}")
    params: list[ParamSpec] = []
    seen: set[str] = set()
    for key, entry in raw.items():
        where = f"{prefix}.{key}"
        if not isinstance(key, str) or not key:
            raise StudyError(prefix, f"got key {key!r}; allowed: a dotted config key")
        if key in _STUDY_OWNED:
            raise StudyError(where, f"not searchable: {_STUDY_OWNED[key]}")
        if key.startswith(_NOT_SEARCHABLE_PREFIXES) or key in _NOT_SEARCHABLE:
            raise StudyError(where, "not a hyperparameter; set it in base")
        hint = _field_hint(key, where=where)
        if method is not None and not _applies(key, method):
            raise StudyError(where, f"does not affect method {method.value}")
        param = _parse_param(key, entry, where=where, hint=hint)
        for dep, _ in param.when:
            if dep not in seen:
                _field_hint(dep, where=f"{where}.when.{dep}")
        if param.scale_by is not None:
            dep_hint = _field_hint(param.scale_by, where=f"{where}.scale_by")
            if dep_hint is not float:
                raise StudyError(f"{where}.scale_by", f"{param.scale_by!r} is not a number setting")
        seen.add(key)
        params.append(param)
    return tuple(params)


def _parse_param(key: str, entry: Any, *, where: str, hint: Any) -> ParamSpec:
    if not isinstance(entry, Mapping):
        raise StudyError(where, f"got {entry!r}; allowed: {{type: float|int|categorical, ...}}")
    _reject_unknown(
        entry, ("type", "low", "high", "log", "step", "choices", "when", "scale_by"), prefix=where
    )
    kind = _enum(ParamKind, entry.get("type"), f"{where}.type")
    when = _parse_when(entry.get("when"), where=f"{where}.when")
    scale_by = entry.get("scale_by")
    if scale_by is not None and (not isinstance(scale_by, str) or kind is not ParamKind.FLOAT):
        raise StudyError(f"{where}.scale_by", "allowed only on a float entry, naming a dotted key")
    if kind is ParamKind.CATEGORICAL:
        for extra in ("low", "high", "log", "step"):
            if extra in entry:
                raise StudyError(f"{where}.{extra}", "not allowed for type categorical")
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise StudyError(f"{where}.choices", f"got {choices!r}; allowed: a non-empty list")
        if not all(c is None or isinstance(c, str | bool | int | float) for c in choices):
            raise StudyError(
                f"{where}.choices", "choices must be strings, numbers, booleans or null"
            )
        return ParamSpec(key=key, kind=kind, choices=tuple(choices), when=when)
    if "choices" in entry:
        raise StudyError(f"{where}.choices", f"not allowed for type {kind.value}")
    if kind is ParamKind.FLOAT and hint is not float:
        allowed = "int or categorical" if hint is int else "categorical"
        raise StudyError(f"{where}.type", f"{key} is not a float setting; use type {allowed}")
    if kind is ParamKind.INT and hint not in (int, float):
        raise StudyError(f"{where}.type", f"{key} is not a number setting; use type categorical")
    low, high = entry.get("low"), entry.get("high")
    check = _is_int if kind is ParamKind.INT else _is_number
    for name, value in (("low", low), ("high", high)):
        if not check(value) or not math.isfinite(value):
            allowed = "an integer" if kind is ParamKind.INT else "a finite number"
            raise StudyError(f"{where}.{name}", f"got {value!r}; allowed: {allowed}")
    if not low < high:
        raise StudyError(f"{where}.high", f"got {high!r}; allowed: > low={low!r}")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise StudyError(f"{where}.log", f"got {log!r}; allowed: true or false")
    if log and low <= 0:
        raise StudyError(f"{where}.low", f"got {low!r}; allowed: > 0 with log: true")
    step = entry.get("step")
    if step is not None:
        if not check(step) or step <= 0:
            raise StudyError(f"{where}.step", f"got {step!r}; allowed: a number > 0 or null")
        if log:
            raise StudyError(f"{where}.step", "not allowed together with log: true")
    return ParamSpec(
        key=key,
        kind=kind,
        low=float(low) if kind is ParamKind.FLOAT else int(low),
        high=float(high) if kind is ParamKind.FLOAT else int(high),
        log=log,
        step=step,
        when=when,
        scale_by=scale_by,
    )


def _parse_when(raw: Any, *, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise StudyError(where, "expected a mapping {dotted.key: value or [values]}")
    out = []
    for key, values in raw.items():
        values = values if isinstance(values, list) else [values]
        out.append((str(key), tuple(values)))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Cross-checks against TrainConfig
# --------------------------------------------------------------------------------------------------


def _check_against_config(spec: StudySpec, *, shared_keys: set[str]) -> None:
    """Probe every bound and choice of every entry through `TrainConfig.from_dict`."""
    for group in _probe_groups(spec):
        base = _defaults_with(spec.base)
        try:
            trial_config(spec, group, {}, seed=spec.seeds[0])
        except ConfigError as exc:
            raise StudyError(f"base.{exc.field}", _message(exc)) from None
        for param in spec.space_for(group.method):
            prefix = "space" if param.key in shared_keys else f"method_space.{group.method.value}"
            conditions = {k: v[0] for k, v in param.when}
            for where, value in param.probe_values():
                if param.scale_by is not None:
                    value = value * lookup_key(base, param.scale_by)
                probe = _complete_probe(
                    spec.space_for(group.method), {**conditions, param.key: value}, base=base
                )
                try:
                    trial_config(spec, group, probe, seed=spec.seeds[0])
                except ConfigError as exc:
                    key = f"{prefix}.{param.key}.{where}"
                    if exc.field != param.key and exc.field not in conditions:
                        key = f"{key} (with {exc.field})"
                    raise StudyError(key, _message(exc)) from None


def _complete_probe(
    params: Sequence[ParamSpec], probe: dict[str, Any], *, base: Mapping[str, Any]
) -> dict[str, Any]:
    """Add the conditional entries that `probe` switches on (at their first value), so that probing
    e.g. `clip.schedule: exp_decay` also sets the `c_final` that only exists for it."""
    out = dict(probe)
    for param in params:
        if param.key in out or not param.when:
            continue
        if all(out.get(k, lookup_key(base, k)) in allowed for k, allowed in param.when):
            value = param.probe_values()[0][1]
            if param.scale_by is not None:
                value = value * out.get(param.scale_by, lookup_key(base, param.scale_by))
            out[param.key] = value
    return out


def _probe_groups(spec: StudySpec) -> list[Group]:
    # One group per method suffices: ε does not enter config validation.
    return [next(g for g in spec.groups() if g.method is m) for m in spec.methods]


def _message(exc: ConfigError) -> str:
    text = str(exc)
    prefix = f"{exc.field}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _check_enqueue(spec: StudySpec) -> None:
    for i, point in enumerate(spec.search.enqueue):
        for key, value in point.items():
            params = [p for m in spec.methods for p in spec.space_for(m) if p.key == key]
            if not params:
                raise StudyError(f"search.enqueue[{i}].{key}", "not a key of the search space")
            if not any(p.contains(value) for p in params):
                raise StudyError(f"search.enqueue[{i}].{key}", f"got {value!r}; outside its space")


def enqueued_points(spec: StudySpec, method: Method) -> list[dict[str, Any]]:
    """The `search.enqueue` points as they apply to `method`: keys it searches, values in range."""
    params = {p.key: p for p in spec.space_for(method)}
    out = []
    for point in spec.search.enqueue:
        own = {k: v for k, v in point.items() if k in params and params[k].contains(v)}
        if own:
            out.append(own)
    return out


def _check_combinations(spec: StudySpec) -> None:
    if spec.search.early_stopping is not None and len(spec.seeds) > 1:
        raise StudyError(
            "search.early_stopping",
            "early stopping needs one seed per trial (a trial's seeds run one after another); "
            "use seeds: [one seed] or early_stopping: null",
        )
    if spec.resources.workers > 1 and spec.resources.cpus_per_trial != 1:
        raise StudyError(
            "resources.cpus_per_trial",
            "applies to single-worker trials; Ray Train workers size themselves",
        )
    if spec.tuning_within_budget:
        reasons = []
        if spec.search.sampler is not SamplerKind.RANDOM:
            reasons.append(("search.sampler", "needs sampler: random"))
        if spec.search.early_stopping is not None:
            reasons.append(("search.early_stopping", "needs early_stopping: null"))
        if not spec.trials.is_random:
            reasons.append(
                ("trials", "needs a drawn trial count (poisson or truncated_negative_binomial)")
            )
        if spec.search.enqueue:
            reasons.append(("search.enqueue", "needs no enqueued points"))
        for method in spec.methods:
            searched = spec.searched_keys(method) & set(SAMPLING_KEYS)
            if searched:
                key = sorted(searched)[0]
                reasons.append((key, "needs epochs and batch size fixed (one σ for every trial)"))
        if reasons:
            key, why = reasons[0]
            raise StudyError(
                "tuning_within_budget",
                f"{why} ({key}); the selection-procedure bound would not hold",
            )


# --------------------------------------------------------------------------------------------------
# Trial configs and suggestions
# --------------------------------------------------------------------------------------------------


def _has(raw: Mapping[str, Any], key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _defaults_with(base: Mapping[str, Any]) -> dict[str, Any]:
    """The fully resolved base (defaults filled in), as a plain nested dict."""
    return TrainConfig.from_dict(base).to_dict()


def trial_config(
    spec: StudySpec,
    group: Group,
    params: Mapping[str, Any],
    *,
    seed: int,
    noise_multiplier: float | None = None,
    threads: int | None = None,
) -> TrainConfig:
    """The validated run config of one trial run: base + method + budget + params + seed.

    `noise_multiplier` (tuning within budget) replaces calibration to the group's ε: the run then
    spends less than ε, so that the whole selection procedure meets it. Raises `ConfigError`.
    """
    raw = copy.deepcopy(dict(spec.base))
    raw["method"] = group.method.value
    raw["seed"] = int(seed)
    set_key(raw, "privacy.delta", spec.delta)
    if group.epsilon is not None:
        if noise_multiplier is None:
            set_key(raw, "privacy.epsilon", group.epsilon)
        else:
            set_key(raw, "privacy.epsilon", None)
            set_key(raw, "privacy.noise_multiplier", float(noise_multiplier))
    for key, value in params.items():
        set_key(raw, key, value)
    if threads is not None and not _has(raw, "runtime.threads"):
        set_key(raw, "runtime.threads", int(threads))
    return TrainConfig.from_dict(raw)


class SuggestTrial(Protocol):
    """The part of `optuna.Trial` that `suggest` uses."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def suggest(
    params: Sequence[ParamSpec], trial: SuggestTrial, *, base: Mapping[str, Any]
) -> dict[str, Any]:
    """Draw one point of the space (define-by-run), in file order, honouring `when` and `scale_by`.

    Returns config values by dotted key (scaled where `scale_by` is set). Entries whose `when`
    condition fails are not drawn (they keep their base value).
    """
    resolved = _defaults_with(base)
    values: dict[str, Any] = {}

    def current(key: str) -> Any:
        return values[key] if key in values else lookup_key(resolved, key)

    for param in params:
        if not all(current(k) in allowed for k, allowed in param.when):
            continue
        if param.kind is ParamKind.CATEGORICAL:
            value = trial.suggest_categorical(param.key, list(param.choices))
        elif param.kind is ParamKind.INT:
            value = trial.suggest_int(
                param.key,
                int(param.low),
                int(param.high),
                step=int(param.step or 1),
                log=param.log,  # type: ignore[arg-type]
            )
        else:
            value = trial.suggest_float(
                param.key,
                float(param.low),
                float(param.high),
                step=param.step,
                log=param.log,  # type: ignore[arg-type]
            )
        if param.scale_by is not None:
            value = float(value) * float(current(param.scale_by))
        values[param.key] = value
    return values
