"""Training config: presets load, dotted overrides parse by type, bad keys/values are clear errors."""

import pytest

from moshi_jax.training.config import (
    ConfigError,
    DataSource,
    TrainConfig,
    apply_overrides,
    available_configs,
    from_json,
    get_preset,
    load_config,
    main_overrides,
    to_json,
)


def test_every_preset_file_loads_and_roundtrips_through_json():
    names = available_configs()
    assert {"tiny", "100m", "2b", "7b"} <= set(names)
    for name in names:
        cfg = get_preset(name)
        assert isinstance(cfg, TrainConfig)
        assert from_json(to_json(cfg)) == cfg


def test_seven_b_preset_is_moshi_finetune_example():
    cfg = get_preset("7b")
    assert cfg.lora.enabled and cfg.lora.rank == 128 and cfg.lora.scaling == 2.0
    assert cfg.optimizer.lr == 2e-6 and cfg.optimizer.schedule == "one_cycle" and cfg.optimizer.pct_start == 0.05
    assert (cfg.optimizer.b1, cfg.optimizer.b2, cfg.optimizer.eps, cfg.optimizer.weight_decay) == (0.9, 0.95, 1e-8,
                                                                                                   0.1)
    assert cfg.loss.first_codebook_weight_multiplier == 100.0 and cfg.loss.text_padding_weight == 0.5


def test_dotted_overrides_are_parsed_by_field_type():
    cfg = apply_overrides(get_preset("tiny"), [
        "optimizer.lr=3e-4", "mesh.fsdp=2", "mesh.data=1e0", "lora.enabled=true", "checkpoint.async_save=no",
        "init_from=/ckpt/model.safetensors", "data.sources=/a:2,/b", "model.depth.num_layers=3",
        'mesh.rules=[["embed", "fsdp"], ["batch", ["data", "fsdp"]], ["layers", null]]',
    ])
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.mesh.fsdp == 2 and cfg.mesh.data == 1
    assert cfg.lora.enabled is True and cfg.checkpoint.async_save is False
    assert cfg.init_from == "/ckpt/model.safetensors"
    assert cfg.data.sources == (DataSource("/a", 2.0), DataSource("/b", 1.0))
    assert cfg.model.overrides == (("depth.num_layers", "3"),)
    assert cfg.mesh.rules == (("embed", "fsdp"), ("batch", ("data", "fsdp")), ("layers", None))
    assert apply_overrides(cfg, ["init_from=none"]).init_from is None


@pytest.mark.parametrize("item,message", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
    ("nope=1", "unknown config key 'nope'"),
    ("optimizer.lr=fast", "optimizer.lr: expected a float"),
    ("steps=1.5", "steps: expected an int"),
    ("lora.enabled=maybe", "expected a bool"),
    ("mesh=3", "is a section"),
    ("steps.x=3", "is a value, not a section"),
    ("optimizer.schedule=linear", "optimizer.schedule must be one of"),
    ("optimizer.microbatches=3", "not divisible by optimizer.microbatches"),
    ("mesh.fsdp=0", "mesh sizes must be positive"),
    ("mesh.rules=[embed]", "expected JSON"),
    ("data.sources=/a:-1", "weight must be > 0"),
    ("lr", "not of the form key=value"),
])
def test_bad_override_raises_config_error_naming_the_key(item, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(get_preset("tiny"), [item])


def test_unknown_preset_and_argv_splitting():
    with pytest.raises(ConfigError, match="unknown config 'huge'"):
        load_config("huge", check_model=False)
    assert main_overrides(["7b", "steps=3"]) == ("7b", ["steps=3"])
    assert main_overrides(["steps=3"]) == ("tiny", ["steps=3"])
    with pytest.raises(ConfigError, match="key=value"):
        main_overrides(["7b", "tiny"])


def test_mesh_shape_fills_minus_one_and_checks_device_count():
    cfg = get_preset("tiny").mesh
    assert apply_overrides(get_preset("tiny"), ["mesh.tensor=2"]).mesh.shape(8) == (1, 4, 2)
    assert cfg.shape(8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="needs 4 devices"):
        apply_overrides(get_preset("tiny"), ["mesh.fsdp=2", "mesh.tensor=2"]).mesh.shape(8)
