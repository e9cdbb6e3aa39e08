"""`dist-gan export --onnx`: every shipped generator architecture as ONNX, run by onnxruntime (CPU) on
batches of 1 and 7, gives PyTorch's images within 1e-4."""

from __future__ import annotations

import json

import onnxruntime as ort  # noqa: E402  (the dev extra installs it)
import pytest
import torch

from dist_gan.config import load_config
from dist_gan.models import build_generator
from dist_gan.run.registry import registered_names
from dist_gan.tools.export import ONNX_FILE, export_onnx, onnx_inputs

from conftest import REPO, run_cli
from helpers import run_here

pytestmark = pytest.mark.tier("unit")

# (config, overrides): every generator architecture, conditional and not, at small sizes
CASES = {
    "dcgan": ("mnist_dcgan", {"model.generator.width": 8}),
    "mlp": ("mnist_dcgan", {"model.generator.arch": "mlp", "model.generator.width": 32}),
    "dcgan_conditional": ("mnist_cgan", {"model.generator.width": 8}),
    "resnet": ("mnist_resnet", {"model.generator.width": 8}),
    "resnet_conditional_bn_attention": ("cifar10_resnet_cond", {"model.generator.width": 8,
                                                               "model.generator.attention_res": 16}),
    "stylegan2": ("folder256_stylegan2", {"model.generator.width": 4, "data.resolution": 32,
                                          "model.generator.mapping_layers": 2}),
    "rnn": ("mnist_rnngan", {"model.generator.width": 16}),
    "r3gan": ("mnist_r3gan", {"model.generator.widths": "[16,16,16]"}),
    "r3gan_conditional": ("cifar10_r3gan", {"model.generator.widths": "[16,16,16,16]",
                                            "model.generator.blocks": "[1,1,1,1]"}),
}


def generator_of(name: str):
    config_name, overrides = CASES[name]
    config = load_config(REPO / "configs" / f"{config_name}.yaml", {**overrides, "data.folder": None},
                         registered_names())
    torch.manual_seed(0)
    generator = build_generator(config).eval().requires_grad_(False)
    with torch.no_grad():  # trained-looking statistics and weights, not the initial ones
        for module in generator.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        for param in generator.parameters():
            if param.abs().sum() == 0:  # fix-up's zeroed last layers: make every branch count
                param.normal_(0, 0.05)
        for module in generator.modules():
            if hasattr(module, "noise_strength"):  # StyleGAN2's noise is random in both; compared off
                module.noise_strength.zero_()
    return config, generator


@pytest.mark.parametrize("name", list(CASES))
def test_onnx_runs_in_onnxruntime_like_pytorch(tmp_path, name):
    config, generator = generator_of(name)
    arch, classes = config.model.generator.arch, config.model.num_classes
    record = export_onnx(generator, arch, config.model.z_dim, classes, tmp_path / ONNX_FILE)
    session = ort.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == record["inputs"]
    for batch in (1, 7):
        z = torch.randn(batch, config.model.z_dim, generator=torch.Generator().manual_seed(batch))
        labels = torch.arange(batch) % classes if classes else None
        for truncation in ((1.0, 0.7) if arch == "stylegan2" else (1.0,)):
            feeds = {k: v.numpy() for k, v in onnx_inputs(arch, z, labels, truncation).items()}
            images, = session.run(None, feeds)
            expected = generator(z, labels, truncation=truncation) if arch == "stylegan2" else generator(z, labels)
            assert images.shape == (batch, config.data.channels, config.data.resolution, config.data.resolution)
            assert expected.abs().max() > 0.01  # not a blank image: the comparison means something
            torch.testing.assert_close(torch.from_numpy(images), expected, rtol=0, atol=1e-4)


def test_stylegan2_unfused_modulation_is_the_grouped_one():
    """The form ONNX gets (styles on the activations, demodulation on the output) computes what the
    training form (one convolution grouped over the batch) does."""
    config, generator = generator_of("stylegan2")
    z = torch.randn(5, config.model.z_dim)
    grouped = generator(z)
    for module in generator.modules():
        if hasattr(module, "grouped"):
            module.grouped = False
    torch.testing.assert_close(generator(z), grouped, rtol=0, atol=1e-5)


def test_stylegan2_noise_stays_random_in_onnx(tmp_path):
    config, generator = generator_of("stylegan2")
    for module in generator.modules():
        if hasattr(module, "noise_strength"):
            module.noise_strength.fill_(0.5)
    export_onnx(generator, "stylegan2", config.model.z_dim, 0, tmp_path / ONNX_FILE)
    session = ort.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in onnx_inputs("stylegan2", torch.randn(2, config.model.z_dim), None).items()}
    first, second = (session.run(None, feeds)[0] for _ in range(2))
    assert abs(first - second).max() > 1e-3


@pytest.mark.tier("e2e")
def test_export_command_writes_the_onnx_file_and_says_how_to_run_it(tmp_path, mnist_dir, capsys):
    run, out = tmp_path / "run", tmp_path / "export"
    run_cli(["dist_gan.train", "configs/mnist_cgan.yaml", f"--run.dir={run}", f"--data.mnist_dir={mnist_dir}",
             "--data.format=memory", "--data.limit=256", "--train.max_steps=2", "--run.ckpt_every=2",
             "--model.generator.width=8", "--model.discriminator.width=8"])
    run_here(["dist_gan.export", str(run), f"--out={out}", "--onnx"], capsys)
    info = json.loads((out / "config.json").read_text())
    assert info["onnx"]["inputs"] == ["z", "labels"] and (out / ONNX_FILE).is_file()
    card = (out / "README.md").read_text()
    assert "onnxruntime" in card and ONNX_FILE in card
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    images, = session.run(None, {"z": torch.randn(3, info["z_dim"]).numpy(),
                                 "labels": torch.tensor([0, 4, 9]).numpy()})
    assert images.shape == (3, 1, 28, 28)
