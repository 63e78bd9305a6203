"""Config loading, overrides and validation messages (field, value, fix)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from bissl.config import (
    ConfigError,
    RunConfig,
    available_presets,
    check_data_sizes,
    config_to_yaml,
    load_config,
    validate_config,
)


def test_presets_present_and_valid() -> None:
    assert {"digits", "fashion-mnist", "stl10-paper"} <= set(available_presets())
    for name in available_presets():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        # the resolved YAML round-trips to the same config
        assert validate_config(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_stl10_paper_preset_has_reference_values() -> None:
    """Values from the reference notes (section 3 and the quirks of section 4)."""
    cfg = load_config("stl10-paper")
    assert (cfg.model.arch, cfg.model.small_images, cfg.data.image_size) == ("resnet18", False, 96)
    assert (cfg.data.pretext_dataset, cfg.data.pretext_split) == ("stl10", "unlabeled")
    p = cfg.pretext
    assert (p.epochs, p.batch_size, p.lr, p.temperature) == (600, 1024, 4.8, 0.5)
    assert (p.momentum, p.weight_decay, p.trust_coefficient) == (0.9, 1e-6, 0.001)
    assert (p.warmup_epochs, p.final_lr_ratio, p.lr_scaled_by_batch) == (10, 0.001, False)
    assert cfg.augment.aspect_ratio_quirk is True
    assert (cfg.model.projector_hidden_dim, cfg.model.projector_out_dim) == (256, 256)
    f = cfg.finetune
    assert (f.epochs, f.batch_size, f.momentum, f.final_lr_ratio) == (400, 256, 0.9, 0.001)
    s = cfg.search
    assert (s.trials, s.seeds, tuple(s.lr_range), tuple(s.wd_range)) == (200, 10, (1e-4, 1.0), (1e-5, 1e-2))
    assert (cfg.warmup.epochs, cfg.warmup.bn_train_mode) == (20, True)
    b = cfg.bissl  # issue 18: the released code's lower warm-up, Hessian batch, theta_D start, split
    assert (b.lower_warmup_steps, b.lower_warmup_first_step_full_lr, b.hessian_batch_source) == (980, True, "reference")
    assert (b.upper_init, cfg.augment.downstream_interpolation, cfg.data.val_size) == ("warmup", "bicubic", 1000)


def test_overrides_parse_yaml_values() -> None:
    cfg = load_config("digits", ["pretext.epochs=5", "augment.crop_scale=[0.2, 0.9]",
                                 "pretext.grad_clip=null", "data.val_fraction=0.2"])
    assert cfg.pretext.epochs == 5
    assert cfg.augment.crop_scale == (0.2, 0.9)
    assert cfg.pretext.grad_clip is None
    assert cfg.data.val_fraction == 0.2


# (overrides, substrings that the error message must contain: field, value, fix)
BAD = [
    (["pretext.temperature=0"], ["pretext.temperature", "0", "greater than 0", "Fix"]),
    (["pretext.temperature=-0.5"], ["pretext.temperature", "-0.5", "Fix"]),
    (["finetune.lr=-1"], ["finetune.lr", "-1", "Fix"]),
    (["data.dataset=digitz"], ["data.dataset", "'digitz'", "did you mean 'digits'", "Fix"]),
    (["pretext.tau=0.5"], ["pretext.tau", "unknown field", "temperature", "Fix"]),
    (["model.arch=resnet50"], ["model.arch", "'resnet50'", "resnet18", "Fix"]),
    (["pretext.warmup_epochs=40"], ["pretext.warmup_epochs", "40", "pretext.epochs=15", "Fix"]),
    (["search.lr_range=[1.0, 0.1]"], ["search.lr_range", "[1.0, 0.1]", "Fix"]),
    (["augment.crop_scale=[0.5, 2.0]"], ["augment.crop_scale", "2.0", "Fix"]),
    (["model.small_images=false"], ["model.small_images", "image_size=16", "Fix"]),
    (["data.pretext_split=unlabeled"], ["data.pretext_split", "digits", "Fix"]),
    (["data.val_fraction=1.5"], ["data.val_fraction", "1.5", "Fix"]),
    (["pretext.epochs=two"], ["pretext.epochs", "'two'", "Fix"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_gives_clear_error(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("digits", overrides)
    message = str(info.value)
    for text in expected:
        assert text in message, f"{text!r} missing from:\n{message}"


def test_several_errors_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("digits", ["pretext.temperature=0", "finetune.lr=0"])
    assert "pretext.temperature" in str(info.value) and "finetune.lr" in str(info.value)


@pytest.mark.parametrize("item", ["pretext.epochs", "=3", "pretext.epochs.x=3"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config("digits", [item])


def test_unknown_preset_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*digits"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_file_config(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\npretext:\n  epochs: 2\n  warmup_epochs: 1\n")
    cfg = load_config(str(path))
    assert (cfg.name, cfg.pretext.epochs) == ("mine", 2)


def test_batch_larger_than_dataset() -> None:
    cfg = load_config("digits", ["pretext.batch_size=5000"])
    with pytest.raises(ConfigError, match=r"pretext\.batch_size: got 5000.*1222 items.*Fix"):
        check_data_sizes(cfg, {"pretext": 1222, "train": 1222, "val": 216})
    cfg = load_config("digits", ["finetune.batch_size=127"])
    with pytest.raises(ConfigError, match=r"finetune\.batch_size: got 127.*world size 2"):
        check_data_sizes(cfg, {"pretext": 1222, "train": 1222, "val": 216}, world_size=2)
    check_data_sizes(load_config("digits"), {"pretext": 1222, "train": 1222, "val": 216})
