from pathlib import Path

import pytest

from dist_gan.config import Config, ConfigError, load_config, save_config
from dist_gan.run.registry import registered_names

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parents[1]
WGANGP = REPO / "configs" / "mnist_wgangp.yaml"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_builds_its_networks(name):
    """Every config in configs/ loads with the registries' names and its G, D (and E) build and run."""
    import torch

    from dist_gan.models import build_discriminator, build_encoder, build_generator

    config = load_config(REPO / "configs" / name, {"data.folder": None} if "folder" in name else None,
                         registered_names())
    if config.data.resolution > 64 or max(config.model.generator.widths or [0]) > 256:  # keep it quick
        shrink = {"data.resolution": 32, "model.generator.width": 4, "model.discriminator.width": 4}
        for net in ("generator", "discriminator"):
            if config.model.generator.arch == "r3gan":
                shrink[f"model.{net}.widths"] = "[16,16,16,16]"
                shrink[f"model.{net}.blocks"] = "[1,1,1,1]"
        config = load_config(REPO / "configs" / name, {**shrink, "data.folder": None}, registered_names())
    G, D, E = build_generator(config), build_discriminator(config), build_encoder(config)
    labels = torch.randint(0, config.model.num_classes, (2,)) if config.model.num_classes else None
    images = G(torch.randn(2, config.model.z_dim), labels)
    assert images.shape == (2, config.data.channels, config.data.resolution, config.data.resolution)
    assert D(images, labels).shape == (2,)
    if E is not None:
        assert E(images)[0].shape == (2, config.model.z_dim)


def test_wgangp_recipe():
    config = load_config(WGANGP)
    assert (config.loss.name, config.loss.gp_weight, config.optim.n_critic) == ("wgan_gp", 10.0, 5)
    assert config.optim.betas == (0.0, 0.9) and config.optim.g_lr == 1e-4
    assert config.model.discriminator.norm != "batch"
    assert config.train.ema_kimg > 0 and config.train.ema_decay is None


def test_overrides_are_typed_from_strings():
    config = load_config(WGANGP, {"train.max_steps": "200", "data.mnist_dir": "x/y", "run.dir": "r",
                                  "optim.betas": "[0.5, 0.99]", "model.discriminator.spectral_norm": "true",
                                  "train.mixed_precision": "bf16", "train.resume": "auto"})
    assert config.train.max_steps == 200 and config.data.mnist_dir == "x/y" and config.run.dir == "r"
    assert config.optim.betas == (0.5, 0.99) and config.model.discriminator.spectral_norm is True
    assert config.train.mixed_precision == "bf16" and config.train.resume == "auto"


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step'.*did you mean 'train\.max_steps'"):
        load_config(WGANGP, {"train.max_step": 10})


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  g_lr: 1.0e-4\n  n_critc: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'optim\.n_critc'.*did you mean 'optim\.n_critic'"):
        load_config(bad)


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(None, {"optimm.g_lr": 1.0})


@pytest.mark.parametrize("key,value,pattern", [
    ("optim.g_lr", -1e-4, r"optim\.g_lr = -0\.0001: must be > 0"),
    ("optim.n_critic", 0, r"optim\.n_critic = 0: must be >= 1"),
    ("train.max_steps", "many", r"train\.max_steps = 'many' is not an integer"),
    ("train.mixed_precision", "fp8", r"train\.mixed_precision = 'fp8' is not one of \['no', 'bf16', 'fp16'\]"),
    ("optim.betas", [0.5], r"optim\.betas = \[0\.5\] is not a list of 2 values"),
    ("loss.name", "wassersteen", r"loss\.name = 'wassersteen': is not one of"),
    ("model.generator.arch", "stylegan9", r"model\.generator\.arch = 'stylegan9': is not one of"),
    ("model.discriminator.spectral_norm", "maybe", r"spectral_norm = 'maybe' is not true or false"),
])
def test_bad_values_name_key_and_value(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(WGANGP, {key: value}, registered_names())


def test_batchnorm_critic_with_gradient_penalty_is_refused():
    with pytest.raises(ConfigError, match=r"model\.discriminator\.norm = 'batch'.*gradient penalty"):
        load_config(WGANGP, {"model.discriminator.norm": "batch"})


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(WGANGP, {"optim.g_lr": 0, "optim.d_lr": -1, "run.keep_last": 0})
    assert all(k in str(err.value) for k in ("optim.g_lr", "optim.d_lr", "run.keep_last"))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(WGANGP, {"train.max_steps": 7, "optim.betas": [0.1, 0.2]})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert load_config(None) == Config()
