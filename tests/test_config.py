"""TrainConfig: presets, typed overrides, validation with helpful errors, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from preprocessing.errors import UserError
from trainer.config import PRESETS, TrainConfig, apply_overrides, preset


def test_presets_exist_and_match_ufldl():
    assert {"tiny", "digits", "mnist", "natural-patches"} <= set(PRESETS)
    for name in PRESETS:
        cfg = preset(name)
        assert cfg == TrainConfig(**dataclasses.asdict(cfg))  # validates
    mnist = preset("mnist")
    assert (mnist.input_shape, mnist.hidden) == ((28, 28, 1), 196)
    assert (mnist.rho, mnist.weight_decay, mnist.beta) == (0.1, 3e-3, 3.0)
    patches = preset("natural-patches")
    assert (patches.input_shape, patches.hidden, patches.rho) == ((8, 8, 1), 25, 0.01)
    assert (patches.weight_decay, patches.beta) == (1e-4, 3.0)
    assert (patches.normalization, patches.decoder) == ("ufldl_patches", "sigmoid")
    digits = preset("digits")
    assert digits.input_shape == (8, 8, 1) and digits.rho == 0.1
    conv = preset("mnist-conv")
    assert conv.patch_size == 8 and conv.input_shape == (8, 8, 1) and conv.hidden >= 200
    for cfg in (mnist, conv):  # several passes over builtin:mnist's ~4,000 train images
        assert cfg.epochs * cfg.steps_per_epoch * cfg.global_batch_size >= 50 * 4000


def test_defaults():
    cfg = TrainConfig()
    assert cfg.input_shape == (8, 8, 1) and cfg.hidden == 25 and cfg.decoder == "sigmoid"
    assert (cfg.rho, cfg.beta, cfg.weight_decay, cfg.eps) == (0.1, 3.0, 3e-3, 1e-6)
    assert cfg.batch_norm == "none" and cfg.rho_hat_momentum == 0.0 and cfg.l1_activity == 0.0
    assert (cfg.optimizer, cfg.global_batch_size, cfg.steps_per_epoch) == ("adam", 256, 0)


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UserError, match="unknown preset 'cifar'.*tiny, digits, mnist"):
        preset("cifar")


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("tiny").hidden = 3


def test_overrides_parse_by_type():
    cfg = apply_overrides(
        preset("tiny"),
        [
            "input_shape=28x28x1",
            "hidden=196",
            "rho=0.05",
            "weight_decay=3e-3",
            "tied_weights=true",
            "decoder=linear",
            "batch_norm=after",
            "normalization=ufldl_patches",
            "optimizer=sgd",
            "l1_activity=0",
            " seed = 7 ",
        ],
    )
    assert cfg.input_shape == (28, 28, 1)
    assert cfg.hidden == 196 and isinstance(cfg.hidden, int)
    assert cfg.rho == 0.05 and cfg.weight_decay == 3e-3
    assert cfg.tied_weights is True
    assert (cfg.decoder, cfg.batch_norm, cfg.normalization) == ("linear", "after", "ufldl_patches")
    assert cfg.optimizer == "sgd" and cfg.seed == 7
    assert isinstance(cfg.l1_activity, float)
    other = apply_overrides(cfg, ["input_shape=32,32,3", "tied_weights=False"])
    assert other.input_shape == (32, 32, 3) and other.tied_weights is False
    assert apply_overrides(cfg, []) == cfg


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(UserError) as e:
        apply_overrides(preset("tiny"), ["hiden=3"])
    assert "'hiden'" in str(e.value) and "hidden" in str(e.value) and "rho" in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("rho=0", "rho=0.0.*strictly between 0 and 1"),
        ("rho=1.5", "rho"),
        ("beta=-1", "beta"),
        ("weight_decay=-1e-3", "weight_decay"),
        ("l1_activity=-0.1", "l1_activity"),
        ("hidden=0", "hidden"),
        ("hidden=2.5", "hidden='2.5'.*integer"),
        ("global_batch_size=0", "global_batch_size"),
        ("decoder=relu", "decoder='relu'.*sigmoid, linear"),
        ("normalization=zca", "normalization.*unit, ufldl_patches"),
        ("batch_norm=middle", "batch_norm.*none, before, after"),
        ("optimizer=rmsprop", "optimizer.*adam, sgd, lbfgs"),
        ("optimizer=lbfgs lbfgs_memory=0", "lbfgs_memory.*integer >= 1"),
        ("optimizer=lbfgs input_shape=4,4,1 patch_size=4", "optimizer.*patch_size > 0.*fixed"),
        ("optimizer=lbfgs rho_hat_momentum=0.9", "optimizer.*rho_hat_momentum > 0"),
        ("optimizer=lbfgs precision=mixed_bfloat16", "optimizer.*mixed precision.*float32"),
        ("tied_weights=maybe", "tied_weights.*true or false"),
        ("input_shape=28,28", "input_shape"),
        ("input_shape=a,b,c", "input_shape.*28,28,1"),
        ("rho_hat_momentum=1", "rho_hat_momentum"),
        ("learning_rate=0", "learning_rate"),
        ("eps=0", "eps"),
        ("steps_per_execution=0", "steps_per_execution.*integer >= 1"),
        ("hidden", "key=value"),
        ("patch_size=-1", "patch_size.*>= 0"),
        ("patch_size=5", "patch_size.*window size of input_shape \\(now 8x8x1\\)"),
        ("zca_epsilon=-1", "zca_epsilon"),
        ("patches_per_image=0", "patches_per_image.*>= 1"),
        ("patches_per_image=2", "patches_per_image=2.*1 with patch_size 0"),
        ("patch_size=8 patches_per_image=5", "patches_per_image=5.*divisor of global_batch_si"),
        ("zca_epsilon=0.1 normalization=ufldl_patches", "zca_epsilon.*unit"),
    ],
)
def test_invalid_values_raise_user_error(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(preset("tiny"), override.split(" "))


def test_every_construction_path_validates():
    with pytest.raises(UserError, match="rho"):
        TrainConfig(rho=2.0)
    with pytest.raises(UserError, match="hidden"):
        dataclasses.replace(preset("mnist"), hidden=0)
    with pytest.raises(UserError, match="decoder"):
        TrainConfig.from_dict({**preset("tiny").to_dict(), "decoder": "tanh"})
    with pytest.raises(UserError, match="unknown config key.*colour"):
        TrainConfig.from_dict({"colour": "red"})
    with pytest.raises(UserError, match="tied_weights"):
        TrainConfig(tied_weights=1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_from_dict_round_trip_through_json(name):
    cfg = apply_overrides(preset(name), ["l1_activity=0.01", "batch_norm=before"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["input_shape"] == list(cfg.input_shape)
    again = TrainConfig.from_dict(d)
    assert again == cfg and isinstance(again.input_shape, tuple)
    # Older config.json files without newer keys still load, with defaults.
    d.pop("eps")
    assert TrainConfig.from_dict(d).eps == TrainConfig().eps


def test_execution_steps_divide_the_epoch_and_the_resume_point():
    cfg = apply_overrides(preset("tiny"), ["steps_per_execution=32"])
    assert cfg.execution_steps(100) == 25
    assert cfg.execution_steps(117) == 13
    assert cfg.execution_steps(64) == 32
    assert cfg.execution_steps(97) == 1  # a prime epoch: one step per call
    assert cfg.execution_steps(100, start_step=250) == 25  # resumed at a call boundary
    assert cfg.execution_steps(100, start_step=230) == 10  # resumed elsewhere: 30 steps done
    assert apply_overrides(cfg, ["steps_per_execution=1"]).execution_steps(100) == 1
