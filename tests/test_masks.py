"""Global mask: top-⌈ρD⌉, per-layer floor, rank-ordered release, frozen pruned coordinates."""

from __future__ import annotations

import itertools
import math

import torch

from adadpigu.config import TrainConfig
from adadpigu.masks import global_mask
from adadpigu.models import build_model
from adadpigu.noise import make_generator
from adadpigu.plan import make_plan
from adadpigu.training import TrainingData, init_state, run_training


def scores() -> dict[str, torch.Tensor]:
    gen = make_generator(0)
    return {
        "a": torch.rand(50, generator=gen) + 10.0,  # the large layer dominates the global ranking
        "b": torch.rand(7, generator=gen),
        "c": torch.rand(3, 3, generator=gen) + 5.0,
    }


def test_keeps_exactly_ceil_rho_d_highest() -> None:
    s = scores()
    mask = global_mask(s, keep_ratio=0.3)
    total = sum(t.numel() for t in s.values())
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == math.ceil(0.3 * total)
    flat_s = torch.cat([t.reshape(-1) for t in s.values()])
    flat_m = torch.cat([m.reshape(-1) for m in mask.values()])
    assert flat_s[flat_m].min() >= flat_s[~flat_m].max()


def test_min_keep_per_layer_keeps_every_tensor_alive() -> None:
    s = scores()
    assert int(global_mask(s, keep_ratio=0.3)["b"].sum()) == 0
    mask = global_mask(s, keep_ratio=0.3, min_keep_per_layer=2)
    assert int(mask["b"].sum()) == 2
    assert bool(mask["b"][s["b"].argmax()])


def test_larger_ratio_is_a_superset_in_rank_order() -> None:
    s = scores()
    small, large = global_mask(s, keep_ratio=0.2), global_mask(s, keep_ratio=0.7)
    for name in s:
        assert bool((large[name] | ~small[name]).all())


def test_pruned_coordinates_never_move_and_release_schedule_grows_the_mask() -> None:
    gen = make_generator(1)
    n, classes = 256, 4
    x = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    config = TrainConfig.from_dict(
        {
            "method": "adadpigu",
            "model": {"name": "mlp"},
            "training": {"epochs": 4, "batch_size": 32, "lr": 0.5, "momentum": 0.9},
            "privacy": {"epsilon": 8.0, "delta": 1e-4},
            "adadpigu": {
                "keep_ratio": 0.3,
                "stage1_fraction": 0.25,
                "release_final_keep_ratio": 0.6,
            },
            "runtime": {"dtype": "float64"},
        }
    )
    plan = make_plan(config, n_train=n)
    model = build_model(
        config.model, input_shape=(1, 4, 4), num_classes=classes, generator=gen
    ).double()
    data = TrainingData(x, y, x[:16], y[:16], x[:16], y[:16])
    state = init_state(config, model)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    masks: dict[int, dict[str, torch.Tensor]] = {}

    def record(report, st) -> None:
        snapshots[report.epoch] = {k: v.detach().clone() for k, v in st.model.named_parameters()}
        if st.mask is not None:
            masks[report.epoch] = {k: v.clone() for k, v in st.mask.items()}

    from adadpigu.training import Callbacks

    run_training(config, plan, data, state, callbacks=Callbacks(on_epoch_end=[record]))
    assert state.keep_ratio == 0.6
    kept = [sum(int(m.sum()) for m in masks[e].values()) for e in sorted(masks)]
    assert kept == sorted(kept) and kept[0] < kept[-1]
    # Between two epochs, coordinates outside the (earlier) mask did not change.
    epochs = sorted(masks)
    for before, after in itertools.pairwise(epochs):
        for name, _frozen in masks[before].items():
            pruned = ~masks[after][name]
            assert torch.equal(snapshots[after][name][pruned], snapshots[before][name][pruned])
