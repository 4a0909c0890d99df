"""Typed, frozen run configuration, validated on creation.

Every setting is defined once here, with its default and its allowed range. Settings that can change
the privacy guarantee (ε, δ, σ, clipping, sampling, the method) are kept apart from those that cannot
(`device`, `dtype`, `eval_batch_size`): see `RuntimeConfig`.

A config is built from a plain mapping (parsed YAML) with `TrainConfig.from_dict`; unknown keys and
out-of-range values raise `ConfigError`, whose message names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Self

__all__ = [
    "AdaDPIGUConfig",
    "ClipConfig",
    "ClipScheduleKind",
    "ConfigError",
    "DataConfig",
    "ImportanceKind",
    "Method",
    "ModelConfig",
    "NormalisationKind",
    "PrivacyConfig",
    "RuntimeConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_overrides",
    "config_hash",
    "lookup_key",
    "set_key",
]


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or outside its allowed range."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class Method(enum.StrEnum):
    NONPRIVATE = "nonprivate"
    DPSGD = "dpsgd"
    OPACUS_DPSGD = "opacus_dpsgd"
    ADADPIGU = "adadpigu"

    @property
    def is_private(self) -> bool:
        return self is not Method.NONPRIVATE


class ClipScheduleKind(enum.StrEnum):
    CONSTANT = "constant"
    EXP_DECAY = "exp_decay"
    LINEAR_DECAY = "linear_decay"
    QUANTILE = "quantile"


class ImportanceKind(enum.StrEnum):
    ABS_SUM = "abs_sum"
    SQ_DEBIASED = "sq_debiased"
    TAYLOR = "taylor"


class NormalisationKind(enum.StrEnum):
    ADACLIP = "adaclip"
    OFF = "off"


class AccountantKind(enum.StrEnum):
    RDP = "rdp"
    PRV = "prv"


class Activation(enum.StrEnum):
    TANH = "tanh"
    RELU = "relu"


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, f"got {value!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig:
    """Clip-norm schedule C_t for one stage.

    constant: C_t = c0. exp_decay: geometric from c0 to c_final over the stage. linear_decay: linear
    from c0 to c_final. quantile (Andrew et al. 2021): C_{t+1} = C_t·exp(−lr·(b̃_t − target)), with
    b̃_t a noised fraction of unclipped examples (count noise std `count_noise`, default qN/20).
    """

    schedule: ClipScheduleKind = ClipScheduleKind.CONSTANT
    c0: float = 1.0
    c_final: float | None = None
    target_quantile: float = 0.5
    quantile_lr: float = 0.2
    count_noise: float | None = None

    def validate(self, prefix: str) -> None:
        _check(math.isfinite(self.c0) and self.c0 > 0, f"{prefix}.c0", self.c0, "a number > 0")
        decays = (ClipScheduleKind.EXP_DECAY, ClipScheduleKind.LINEAR_DECAY)
        if self.schedule in decays:
            _check(
                self.c_final is not None and 0 < self.c_final <= self.c0,
                f"{prefix}.c_final",
                self.c_final,
                f"a number in (0, c0={self.c0}] for schedule {self.schedule.value}",
            )
        _check(
            0 < self.target_quantile < 1,
            f"{prefix}.target_quantile",
            self.target_quantile,
            "(0, 1)",
        )
        _check(self.quantile_lr > 0, f"{prefix}.quantile_lr", self.quantile_lr, "a number > 0")
        if self.count_noise is not None:
            _check(self.count_noise > 0, f"{prefix}.count_noise", self.count_noise, "> 0 or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = "mnist"
    data_dir: str | None = None
    validation_size: int = 5000
    validation_seed: int = 0
    train_limit: int | None = None
    synthetic_size: int = 2048

    def __post_init__(self) -> None:
        _check(bool(self.name), "data.name", self.name, "a registry name or package.module:factory")
        _check(self.validation_size >= 0, "data.validation_size", self.validation_size, ">= 0")
        if self.train_limit is not None:
            _check(self.train_limit > 0, "data.train_limit", self.train_limit, "> 0 or null")
        _check(self.synthetic_size > 0, "data.synthetic_size", self.synthetic_size, "> 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "mnist_cnn"
    activation: Activation = Activation.TANH

    def __post_init__(self) -> None:
        _check(
            bool(self.name), "model.name", self.name, "a registry name or package.module:factory"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Expected batch size B (q = B/N) or the sample rate q directly: exactly one of them."""

    epochs: float = 5
    batch_size: int | None = 256
    sample_rate: float | None = None
    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "training.epochs", self.epochs, "> 0")
        if (self.batch_size is None) == (self.sample_rate is None):
            raise ConfigError(
                "training.batch_size",
                "give exactly one of training.batch_size (expected batch size) "
                "and training.sample_rate",
            )
        if self.batch_size is not None:
            _check(self.batch_size >= 1, "training.batch_size", self.batch_size, "an integer >= 1")
        if self.sample_rate is not None:
            _check(0 < self.sample_rate <= 1, "training.sample_rate", self.sample_rate, "(0, 1]")
        _check(math.isfinite(self.lr) and self.lr > 0, "training.lr", self.lr, "a number > 0")
        _check(0 <= self.momentum < 1, "training.momentum", self.momentum, "[0, 1)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """(ε, δ) target; σ is calibrated to it unless `noise_multiplier` is given (then ε follows).

    `noise_seed` fixes the noise stream: the run becomes reproducible and NOT private.
    `allow_overspend`: after a restart, finish the planned steps even if ε exceeds the target.
    """

    epsilon: float | None = 8.0
    delta: float = 1e-5
    accountant: AccountantKind = AccountantKind.RDP
    noise_multiplier: float | None = None
    clip: ClipConfig = ClipConfig()
    noise_seed: int | None = None
    allow_overspend: bool = False
    epsilon_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError("privacy.epsilon", "give privacy.epsilon or privacy.noise_multiplier")
        if self.epsilon is not None:
            _check(
                math.isfinite(self.epsilon) and self.epsilon > 0,
                "privacy.epsilon",
                self.epsilon,
                "a number > 0",
            )
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "(0, 1/N)")
        if self.noise_multiplier is not None:
            _check(
                self.noise_multiplier >= 0,
                "privacy.noise_multiplier",
                self.noise_multiplier,
                ">= 0 or null",
            )
        _check(
            0 < self.epsilon_tolerance < 1,
            "privacy.epsilon_tolerance",
            self.epsilon_tolerance,
            "(0, 1)",
        )
        self.clip.validate("privacy.clip")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaDPIGUConfig:
    keep_ratio: float = 0.6
    stage1_fraction: float = 0.2
    importance: ImportanceKind = ImportanceKind.ABS_SUM
    min_keep_per_layer: int = 0
    release_final_keep_ratio: float | None = None
    normalisation: NormalisationKind = NormalisationKind.ADACLIP
    beta1: float = 0.9
    beta2: float = 0.999
    gamma: float = 1e-8
    s_min: float = 1e-12
    s_max: float = 1e6
    # Stage 2's gradient estimates the mean gradient (with the quantile schedule about half the
    # examples are unclipped), not DP-SGD's shrunk one, so it usually wants a smaller step size.
    stage2_lr: float | None = None
    # Constant by default: the quantile schedule tracks the median per-example norm, which falls
    # towards 0 late in training on MNIST and stalls stage 2 (measured); the study searches both.
    clip: ClipConfig = ClipConfig(schedule=ClipScheduleKind.CONSTANT, c0=1.0)

    def __post_init__(self) -> None:
        _check(0 < self.keep_ratio <= 1, "adadpigu.keep_ratio", self.keep_ratio, "(0, 1]")
        _check(
            0 <= self.stage1_fraction < 1,
            "adadpigu.stage1_fraction",
            self.stage1_fraction,
            "[0, 1)",
        )
        if self.stage1_fraction == 0 and self.keep_ratio != 1:
            raise ConfigError(
                "adadpigu.stage1_fraction",
                f"got 0 with keep_ratio={self.keep_ratio}; a mask needs a stage 1: "
                "use stage1_fraction in (0, 1) or keep_ratio 1",
            )
        _check(
            self.min_keep_per_layer >= 0,
            "adadpigu.min_keep_per_layer",
            self.min_keep_per_layer,
            ">= 0",
        )
        if self.release_final_keep_ratio is not None:
            _check(
                self.keep_ratio <= self.release_final_keep_ratio <= 1,
                "adadpigu.release_final_keep_ratio",
                self.release_final_keep_ratio,
                f"[keep_ratio={self.keep_ratio}, 1] or null",
            )
        _check(0 <= self.beta1 < 1, "adadpigu.beta1", self.beta1, "[0, 1)")
        _check(0 <= self.beta2 < 1, "adadpigu.beta2", self.beta2, "[0, 1)")
        _check(self.gamma > 0, "adadpigu.gamma", self.gamma, "a number > 0")
        _check(
            0 < self.s_min < self.s_max,
            "adadpigu.s_min",
            (self.s_min, self.s_max),
            "0 < s_min < s_max",
        )
        if self.stage2_lr is not None:
            _check(
                math.isfinite(self.stage2_lr) and self.stage2_lr > 0,
                "adadpigu.stage2_lr",
                self.stage2_lr,
                "a number > 0 or null (null: training.lr)",
            )
        self.clip.validate("adadpigu.clip")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Settings that never change the privacy guarantee."""

    device: str = "auto"
    dtype: str = "float32"
    eval_batch_size: int = 2048
    threads: int | None = None
    # Testing hook: raise at this step on a run's first attempt (deterministic fault injection).
    fault_at_step: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "runtime.device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        _check(
            self.dtype in ("float32", "float64"), "runtime.dtype", self.dtype, "float32, float64"
        )
        _check(self.eval_batch_size >= 1, "runtime.eval_batch_size", self.eval_batch_size, ">= 1")
        if self.threads is not None:
            _check(self.threads >= 1, "runtime.threads", self.threads, ">= 1 or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. `seed` drives sampling and initialisation, never the noise."""

    method: Method = Method.DPSGD
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    adadpigu: AdaDPIGUConfig = AdaDPIGUConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self) -> None:
        if (
            self.method is Method.OPACUS_DPSGD
            and self.privacy.clip.schedule is not ClipScheduleKind.CONSTANT
        ):
            raise ConfigError(
                "privacy.clip.schedule",
                f"got {self.privacy.clip.schedule.value}; method opacus_dpsgd allows only constant",
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        return _build(cls, raw, prefix="")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def config_hash(config: TrainConfig) -> str:
    """A stable short hash of the resolved config (sorted JSON), for tables and run names."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_overrides(raw: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (value parsed as YAML) to a plain mapping, returning a copy."""
    import yaml  # parsing a scalar; yaml is a light dependency and this is config plumbing

    result = json.loads(json.dumps(dict(raw), default=str))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key.sub=value")
        key, _, text = item.partition("=")
        if not key.strip():
            raise ConfigError(item, "empty key in override")
        set_key(result, key.strip(), yaml.safe_load(text))
    return result


def lookup_key(plain: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key (`privacy.clip.c0`) of a plain nested mapping; None if absent."""
    node: Any = plain
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def set_key(plain: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a plain nested dict, creating missing sections."""
    parts = [p for p in key.split(".") if p]
    node = plain
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(key, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


# --- strict mapping → dataclass conversion -------------------------------------------------------


def _build(cls: type, raw: Any, *, prefix: str) -> Any:
    where = prefix or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        field = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(field, f"unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            field = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(hints[name], raw[name], field=field)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong type that the annotations did not catch
        raise ConfigError(where, str(exc)) from exc


def _coerce(hint: Any, value: Any, *, field: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, field=field)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=field)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` as false
            value = "on" if value else "off"
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(m.value for m in hint)
            raise ConfigError(field, f"got {value!r}; allowed: {allowed}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, f"got {value!r}; allowed: true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(field, f"got {value!r}; allowed: an integer")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(field, f"got {value!r}; allowed: a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(field, f"got {value!r}; allowed: a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"got {value!r}; allowed: a string")
        return value
    return value


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj
