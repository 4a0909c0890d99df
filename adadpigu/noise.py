"""Noise generators and Gaussian noise.

The noise generator is seeded from the OS's entropy pool by default and its seed is never returned,
logged or stored. A fixed `noise_seed` makes a run reproducible but NOT private (anyone holding the seed
can subtract the noise): it is an explicit mode that every output of the run must declare.
"""

from __future__ import annotations

import secrets

import torch

__all__ = ["gaussian_like", "make_generator", "make_noise_generator"]


def make_generator(seed: int, *, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for public randomness (sampling, initialisation), from an explicit seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def make_noise_generator(
    *, noise_seed: int | None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator for DP noise: OS entropy unless `noise_seed` is given (reproducible, not private)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)
    return generator


def gaussian_like(
    reference: dict[str, torch.Tensor], *, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Independent N(0, std²) noise shaped like each tensor of `reference`."""
    return {
        name: torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype) * std
        for name, t in reference.items()
    }
