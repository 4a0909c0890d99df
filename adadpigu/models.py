"""Models by registry name or import path, initialised from an explicit generator.

BatchNorm mixes the examples of a batch, so one example's influence is no longer confined to its own
gradient and per-example clipping no longer bounds the sensitivity: such models are rejected.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from adadpigu.config import Activation, ModelConfig

__all__ = ["MODEL_NAMES", "ModelError", "build_model", "count_parameters", "reject_batchnorm"]


class ModelError(ValueError):
    """The model name is unknown or the model is unfit for per-example DP."""


def _activation(kind: Activation) -> type[nn.Module]:
    return {Activation.TANH: nn.Tanh, Activation.RELU: nn.ReLU}[kind]


def mnist_cnn(
    *, input_shape: tuple[int, int, int], num_classes: int, activation: Activation
) -> nn.Module:
    """The 26,010-parameter CNN of Papernot et al. (2021), used by the AdaDPIGU paper on MNIST."""
    act = _activation(activation)
    channels, height, width = input_shape
    if (height, width) != (28, 28):
        raise ModelError(f"model.name=mnist_cnn expects 28x28 inputs, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=8, stride=2, padding=3),
        act(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        act(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        act(),
        nn.Linear(32, num_classes),
    )


def cifar10_cnn(
    *, input_shape: tuple[int, int, int], num_classes: int, activation: Activation
) -> nn.Module:
    """A small VGG-style CNN with GroupNorm (per-example normalisation, safe under DP)."""
    act = _activation(activation)
    channels = input_shape[0]

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
            nn.GroupNorm(min(16, c_out), c_out),
            act(),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1),
            nn.GroupNorm(min(16, c_out), c_out),
            act(),
            nn.AvgPool2d(2),
        ]

    return nn.Sequential(
        *block(channels, 32),
        *block(32, 64),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def mlp(
    *, input_shape: tuple[int, int, int], num_classes: int, activation: Activation
) -> nn.Module:
    """A tiny MLP for tests and quick experiments."""
    act = _activation(activation)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 32),
        act(),
        nn.Linear(32, num_classes),
    )


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": mnist_cnn,
    "cifar10_cnn": cifar10_cnn,
    "mlp": mlp,
}
MODEL_NAMES = tuple(_REGISTRY)


def _resolve_factory(name: str) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"model.name={name!r}: cannot import the factory ({exc})") from exc
    raise ModelError(
        f"model.name={name!r} is unknown; allowed: {', '.join(MODEL_NAMES)} "
        "or an import path package.module:factory"
    )


def reject_batchnorm(model: nn.Module) -> None:
    """Raise if the model normalises across the batch (it would break per-example privacy)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.SyncBatchNorm):
            raise ModelError(
                f"module {name!r} is {type(module).__name__}: batch normalisation mixes examples and "
                "breaks per-example DP; use GroupNorm or LayerNorm"
            )


@torch.no_grad()
def initialise_(model: nn.Module, *, generator: torch.Generator) -> None:
    """PyTorch's default init (Kaiming-uniform weights, uniform biases), from an explicit generator."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv1d):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
            if bias is not None:
                fan_in = weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm | nn.LayerNorm):
            if weight is not None:
                nn.init.ones_(weight)
            if bias is not None:
                nn.init.zeros_(bias)


def build_model(
    config: ModelConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    generator: torch.Generator,
) -> nn.Module:
    """Build the named model and initialise it from `generator` (public randomness)."""
    factory = _resolve_factory(config.name)
    model = factory(input_shape=input_shape, num_classes=num_classes, activation=config.activation)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.name={config.name!r}: the factory returned {type(model).__name__}")
    reject_batchnorm(model)
    initialise_(model, generator=generator)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
