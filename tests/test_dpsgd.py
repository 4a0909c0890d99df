"""DP-SGD core: per-sample clipping, the σ = 0 equivalence with SGD, the noise scale, Poisson
sampling, noise-only steps, seeded versus secure noise, the Opacus reference and config validation.

Every statistical test runs on fixed seeds with an explicit `torch.Generator` for the noise, so a
failure is reproducible; each one is built so that the bug it guards against makes it fail.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adadpigu.clipping import clip_and_sum, per_example_norms
from adadpigu.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from adadpigu.gradients import batch_loss_gradient, per_example_gradients
from adadpigu.mechanisms import dp_release
from adadpigu.models import ModelError, build_model
from adadpigu.noise import make_generator
from adadpigu.plan import make_plan
from adadpigu.sampling import poisson_sample
from adadpigu.training import TrainingData, init_state, run_training
from tests.tiny import (
    F64,
    INPUT_SHAPE,
    NUM_CLASSES,
    assert_ks_scale,
    max_abs_diff,
    params_of,
    tiny_batch,
    tiny_mlp,
)

REPO = Path(__file__).resolve().parent.parent


# --- per-sample gradients and clipping ----------------------------------------------------------


def test_vectorised_clipped_sum_equals_per_example_loop() -> None:
    model = tiny_mlp()
    x, y = tiny_batch(9)
    params = params_of(model)
    per_example = per_example_gradients(model, params, x, y)
    norms = per_example_norms(per_example)
    clip_norm = float(norms.median())  # about half the examples are clipped
    clipped = clip_and_sum(per_example, clip_norm=clip_norm)

    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    loop_norms = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        loop_norms.append(float(norm))
        factor = min(1.0, clip_norm / float(norm))
        for (name, _), g in zip(model.named_parameters(), grads, strict=True):
            expected[name] += factor * g

    assert torch.allclose(norms, torch.tensor(loop_norms, dtype=F64), rtol=1e-12, atol=0)
    assert 0 < int(clipped.unclipped) < x.shape[0]  # both branches of the clip were exercised
    assert int(clipped.unclipped) == sum(n <= clip_norm for n in loop_norms)
    assert max_abs_diff(clipped.total, expected) < 1e-12
    assert clipped.sensitivity == clip_norm
    assert clipped.batch_size == x.shape[0]


def test_clipped_examples_have_the_clip_norm() -> None:
    model = tiny_mlp()
    x, y = tiny_batch(6)
    per_example = per_example_gradients(model, params_of(model), x, y)
    clip_norm = 0.25 * float(per_example_norms(per_example).min())  # every example is clipped
    for i in range(x.shape[0]):
        one = {n: g[i : i + 1] for n, g in per_example.items()}
        total = clip_and_sum(one, clip_norm=clip_norm).total
        norm = math.sqrt(sum(float(t.square().sum()) for t in total.values()))
        assert norm == pytest.approx(clip_norm, rel=1e-10)


# --- σ = 0 and no clipping: DP-SGD is SGD with the divisor qN ----------------------------------


def test_sigma0_unclipped_dp_step_equals_sgd_with_same_divisor() -> None:
    n_train, rate = 40, 0.2
    expected_batch = rate * n_train  # qN = 8, the divisor of both steps
    pool_x, pool_y = tiny_batch(n_train)
    idx = poisson_sample(torch.arange(n_train), rate=rate, generator=make_generator(3))
    assert idx.numel() != expected_batch  # the divisor is qN, not the realised batch size
    x, y = pool_x[idx], pool_y[idx]

    lr = 0.7
    dp_model, sgd_model = tiny_mlp(), tiny_mlp()
    dp_params = params_of(dp_model)
    released, count = dp_release(
        per_example_gradients(dp_model, dp_params, x, y),
        clip_norm=math.inf,
        grad_noise_multiplier=0.0,
        count_std=None,
        expected_batch_size=expected_batch,
        noise_generator=make_generator(4),
    )
    plain = batch_loss_gradient(sgd_model, params_of(sgd_model), x, y, divisor=expected_batch)
    assert count is None
    assert max_abs_diff(released, plain) < 1e-10

    for model, grad in ((dp_model, released), (sgd_model, plain)):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for name, p in model.named_parameters():
            p.grad = grad[name]
        optimizer.step()
    assert max_abs_diff(params_of(dp_model), params_of(sgd_model)) < 1e-10
    assert max_abs_diff(params_of(dp_model), params_of(tiny_mlp())) > 1e-3  # a real step was taken


# --- the noise scale ------------------------------------------------------------------------------


def test_noise_on_zero_gradient_has_std_sigma_c_over_qn() -> None:
    sigma, clip_norm, expected_batch = 1.3, 0.8, 6.5
    zeros = {"w": torch.zeros(4, 60, 50, dtype=F64), "b": torch.zeros(4, 1000, dtype=F64)}
    released, _ = dp_release(
        zeros,
        clip_norm=clip_norm,
        grad_noise_multiplier=sigma,
        count_std=None,
        expected_batch_size=expected_batch,
        noise_generator=make_generator(11),
    )
    samples = torch.cat([t.reshape(-1) for t in released.values()])
    assert samples.numel() == 4000
    assert_ks_scale(samples, sigma * clip_norm / expected_batch)


def test_count_noise_has_its_own_std() -> None:
    # Zero gradients are never clipped, so the centred count of a batch of B is exactly B/2.
    batch, count_std = 4, 3.0
    generator = make_generator(12)
    counts = []
    for _ in range(2000):
        _, count = dp_release(
            {"w": torch.zeros(batch, 3, dtype=F64)},
            clip_norm=1.0,
            grad_noise_multiplier=1.0,
            count_std=count_std,
            expected_batch_size=4.0,
            noise_generator=generator,
        )
        counts.append(count - batch / 2)
    assert_ks_scale(torch.tensor(counts), count_std)


# --- Poisson sampling -----------------------------------------------------------------------------


def test_poisson_batch_sizes_have_binomial_mean_and_variance() -> None:
    n, rate, draws = 1000, 0.05, 3000
    population = torch.arange(n)
    generator = make_generator(5)
    sizes = torch.tensor(
        [poisson_sample(population, rate=rate, generator=generator).numel() for _ in range(draws)],
        dtype=F64,
    )
    mean, var = n * rate, n * rate * (1 - rate)
    # CLT: the sample mean has std √(var/draws); the sample variance ≈ var·√(2/draws) (near-normal).
    assert abs(float(sizes.mean()) - mean) < 4 * math.sqrt(var / draws)
    assert abs(float(sizes.var()) - var) < 4 * var * math.sqrt(2 / draws)


def test_poisson_sample_includes_each_example_independently() -> None:
    n, rate, draws = 50, 0.3, 4000
    population = torch.arange(n)
    generator = make_generator(6)
    hits = torch.zeros(n, dtype=F64)
    for _ in range(draws):
        hits[poisson_sample(population, rate=rate, generator=generator)] += 1
    # each example's inclusion count is Binomial(draws, rate); a shuffled fixed-size batch would
    # still pass this, the variance test above catches it.
    std = math.sqrt(draws * rate * (1 - rate))
    assert float((hits - draws * rate).abs().max()) < 4.5 * std


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_poisson_sample_rejects_rates_outside_unit_interval(rate: float) -> None:
    with pytest.raises(ValueError, match="sample rate"):
        poisson_sample(torch.arange(10), rate=rate, generator=make_generator(0))


# --- noise-only steps and noise randomness -------------------------------------------------------


def test_empty_batch_takes_a_noise_only_step() -> None:
    model = tiny_mlp()
    params = params_of(model)
    x, y = tiny_batch(0)
    per_example = per_example_gradients(model, params, x, y)
    assert all(g.shape[0] == 0 for g in per_example.values())
    sigma, clip_norm, expected_batch, lr = 2.0, 1.5, 3.0, 0.1
    released, _ = dp_release(
        per_example,
        clip_norm=clip_norm,
        grad_noise_multiplier=sigma,
        count_std=None,
        expected_batch_size=expected_batch,
        noise_generator=make_generator(7),
    )
    # The noise is one N(0, 1) draw over the concatenated parameters, in parameter order.
    replay = make_generator(7)
    flat = torch.randn(sum(p.numel() for p in params.values()), generator=replay, dtype=F64)
    expected = dict(zip(params, flat.split([p.numel() for p in params.values()]), strict=True))
    for name, p in params.items():
        noise = expected[name].reshape(p.shape) * sigma * clip_norm / expected_batch
        assert torch.equal(released[name], noise)

    before = {n: p.clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for name, p in model.named_parameters():
        p.grad = released[name]
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach() - before[name], -lr * released[name], rtol=0, atol=1e-15)
        assert float(released[name].abs().min()) > 0


def _tiny_training_data(n_train: int, *, scale: float) -> TrainingData:
    x, y = tiny_batch(n_train, seed=21)
    vx, vy = tiny_batch(8, seed=22)
    return TrainingData(train_x=x * scale, train_y=y, val_x=vx, val_y=vy, test_x=vx, test_y=vy)


def test_run_training_takes_noise_only_steps_on_empty_batches() -> None:
    # q = 1e-3 on N = 3: a step's batch is empty with probability 0.997, and with these seeds every
    # batch is empty. The data can then not influence the weights, whatever it is, but each step
    # still moves them by noise.
    config = TrainConfig.from_dict(
        {
            "method": "dpsgd",
            "seed": 0,
            "model": {"name": "mlp"},
            "training": {"epochs": 0.004, "batch_size": None, "sample_rate": 1e-3, "lr": 0.5},
            "privacy": {"noise_multiplier": 1.0, "delta": 0.1, "noise_seed": 3},
        }
    )
    finals = []
    for scale in (1.0, 1e3):
        data = _tiny_training_data(3, scale=scale)
        plan = make_plan(config, n_train=3)
        assert plan.total_steps == 4
        model = tiny_mlp(seed=config.seed)
        state = run_training(config, plan, data, init_state(config, model))
        assert state.executed_steps == 4
        finals.append(params_of(state.model))
    assert max_abs_diff(finals[0], finals[1]) == 0.0
    assert max_abs_diff(finals[0], params_of(tiny_mlp(seed=config.seed))) > 1e-3


TINY_RUN = {
    "method": "dpsgd",
    "seed": 4,
    "data": {"name": "synthetic", "synthetic_size": 300, "validation_size": 60},
    "model": {"name": "mlp"},
    "training": {"epochs": 1, "batch_size": 40, "lr": 0.5},
    "privacy": {"noise_multiplier": 1.0, "delta": 1e-3},
    "runtime": {"eval_batch_size": 512},
}


def _final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / "model.pt", weights_only=True)


def test_noise_is_fresh_by_default_and_reproducible_only_when_seeded(tmp_path: Path) -> None:
    from study.runner import execute_run

    def run(name: str, noise_seed: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
        raw = {**TINY_RUN, "privacy": {**TINY_RUN["privacy"], "noise_seed": noise_seed}}
        metrics = execute_run(TrainConfig.from_dict(raw), out_dir=tmp_path / name)
        return metrics, _final_weights(tmp_path / name)

    fresh = [run(f"fresh{i}", None) for i in range(2)]
    seeded = [run(f"seeded{i}", 17) for i in range(2)]

    assert max_abs_diff(fresh[0][1], fresh[1][1]) > 1e-4  # same seeds, different noise
    assert max_abs_diff(seeded[0][1], seeded[1][1]) == 0.0  # seeded noise: identical runs
    for metrics, _ in fresh:
        assert metrics["privacy"]["private"] is True
        assert metrics["privacy"]["noise_seeded"] is False
        assert metrics["noise_seeded"] is False
    for metrics, _ in seeded:
        assert metrics["privacy"]["private"] is False
        assert metrics["privacy"]["noise_seeded"] is True
        assert metrics["noise_seeded"] is True
        assert "NOT PRIVATE" in metrics["privacy"]["statement"]
    # Noise seeding changes nothing but the noise: the accounting is the same.
    assert seeded[0][0]["epsilon"] == fresh[0][0]["epsilon"]


# --- the Opacus reference -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus: non-secure RNG, backward hooks
def test_opacus_reference_matches_our_dpsgd(tmp_path: Path) -> None:
    from study.runner import execute_run

    # N = 1024 − 128 = 896 and B = 56: q = 1/16 exactly, so Opacus's loader (1/q batches per epoch)
    # and its accountant use the same q as ours.
    raw = {
        "seed": 0,
        "data": {"name": "synthetic", "synthetic_size": 1024, "validation_size": 128},
        "model": {"name": "mlp"},
        "training": {"epochs": 4, "batch_size": 56, "lr": 0.5},
        "privacy": {"epsilon": 8.0, "delta": 1e-4, "clip": {"c0": 1.0}, "noise_seed": 10},
        "runtime": {"eval_batch_size": 1024},
    }
    ours = execute_run(TrainConfig.from_dict({**raw, "method": "dpsgd"}), out_dir=tmp_path / "ours")
    ref = execute_run(
        TrainConfig.from_dict({**raw, "method": "opacus_dpsgd"}), out_dir=tmp_path / "opacus"
    )

    assert ours["sample_rate"] == ref["sample_rate"] == 1 / 16
    assert ours["sigma"] == ref["sigma"]
    assert ours["steps"] == ref["steps"] == 64
    assert ours["epsilon"] == ref["epsilon"]
    assert ours["epsilon"] <= 8.0
    assert ref["opacus_epsilon"] == pytest.approx(ours["epsilon"], rel=0.03)
    for metrics in (ours, ref):
        assert 0.3 < metrics["test_accuracy"] < 0.95  # far above chance (0.1); noise was applied
    assert abs(ours["test_accuracy"] - ref["test_accuracy"]) < 0.15


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"privacy": {"epsilon": 0.0}}, "privacy.epsilon"),
        ({"privacy": {"epsilon": -1.0}}, "privacy.epsilon"),
        ({"privacy": {"epsilon": math.inf}}, "privacy.epsilon"),
        ({"privacy": {"delta": 0.0}}, "privacy.delta"),
        ({"privacy": {"delta": 1.0}}, "privacy.delta"),
        ({"training": {"batch_size": None, "sample_rate": 0.0}}, "training.sample_rate"),
        ({"training": {"batch_size": None, "sample_rate": 1.5}}, "training.sample_rate"),
        ({"training": {"batch_size": None, "sample_rate": -0.2}}, "training.sample_rate"),
        ({"training": {"batch_size": 0}}, "training.batch_size"),
        ({"training": {"lr": 0.0}}, "training.lr"),
        ({"training": {"lr": -0.1}}, "training.lr"),
        ({"privacy": {"clip": {"c0": 0.0}}}, "privacy.clip.c0"),
        ({"privacy": {"noise_multiplier": -1.0}}, "privacy.noise_multiplier"),
        ({"method": "sgd"}, "method"),
        ({"training": {"lr": "fast"}}, "training.lr"),
        ({"privacy": {"epsilonn": 1.0}}, "privacy.epsilonn"),
    ],
)
def test_invalid_config_names_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(raw)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


def test_sample_rate_one_is_allowed() -> None:
    config = TrainConfig.from_dict({"training": {"batch_size": None, "sample_rate": 1.0}})
    assert make_plan(config, n_train=100).sample_rate == 1.0


@pytest.mark.parametrize("delta", [1e-3, 2e-3, 0.5])
def test_delta_at_least_one_over_n_is_rejected_by_the_plan(delta: float) -> None:
    config = TrainConfig.from_dict({"privacy": {"noise_multiplier": 1.0, "delta": delta}})
    with pytest.raises(ConfigError) as info:
        make_plan(config, n_train=1000)
    assert info.value.field == "privacy.delta"
    assert "1/N" in str(info.value)
    below = TrainConfig.from_dict({"privacy": {"noise_multiplier": 1.0, "delta": 9.9e-4}})
    assert make_plan(below, n_train=1000).delta == 9.9e-4


def test_non_private_method_does_not_need_a_small_delta() -> None:
    config = TrainConfig.from_dict({"method": "nonprivate", "privacy": {"delta": 0.5}})
    assert make_plan(config, n_train=1000).noise_multiplier == 0.0


def test_batch_larger_than_dataset_is_rejected() -> None:
    config = TrainConfig.from_dict({"training": {"batch_size": 101}})
    with pytest.raises(ConfigError) as info:
        make_plan(config, n_train=100)
    assert info.value.field == "training.batch_size"


def test_unknown_model_names_the_field() -> None:
    with pytest.raises(ModelError, match=r"model\.name='resnet9000'"):
        build_model(
            ModelConfig(name="resnet9000"),
            input_shape=INPUT_SHAPE,
            num_classes=NUM_CLASSES,
            generator=make_generator(0),
        )


def test_unknown_dataset_names_the_field() -> None:
    from adadpigu.data import load_splits

    with pytest.raises(ConfigError) as info:
        load_splits(DataConfig(name="imagenet22k"))
    assert info.value.field == "data.name"
    assert "imagenet22k" in str(info.value)


def test_validation_split_larger_than_synthetic_set_is_rejected() -> None:
    from adadpigu.data import load_splits

    with pytest.raises(ConfigError) as info:
        load_splits(DataConfig(name="synthetic", synthetic_size=100, validation_size=100))
    assert info.value.field == "data.validation_size"


# --- layering -------------------------------------------------------------------------------------


def test_core_does_not_import_ray_or_optuna() -> None:
    probe = (
        "import importlib, pkgutil, sys\n"
        "import adadpigu\n"
        "names = [m.name for m in pkgutil.iter_modules(adadpigu.__path__)]\n"
        "assert {'training', 'mechanisms', 'accounting', 'data'} <= set(names), names\n"
        "for name in names:\n"
        "    importlib.import_module('adadpigu.' + name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'optuna'))\n"
        "assert not bad, bad\n"
        "print(len(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 10
