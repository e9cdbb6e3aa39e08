"""The seed's model families as configurations of the one loop: class-conditional GAN, VAE-GAN,
RNN-GAN, and the Improved-GAN techniques, end to end on real MNIST (one and two processes)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import FAST, read_metrics, run_cli
from helpers import CPU_DDP, events, run_here

pytestmark = pytest.mark.tier("e2e")  # every tier but unit is also slow (conftest)

FAMILIES = ["cgan", "vaegan", "rnngan"]


@pytest.fixture
def data(mnist_dir):
    return [f"--data.mnist_dir={mnist_dir}", "--data.format=memory"]


def train(family, run_dir, data, *extra, launcher=None):
    return run_cli(["dist_gan.train", f"configs/mnist_{family}.yaml", f"--run.dir={run_dir}", *data,
                    *FAST, *extra], launcher=launcher)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_checkpoints_resumes_and_samples(tmp_path, data, family, capsys):
    run = tmp_path / family
    train(family, run, data, "--train.max_steps=6", "--run.ckpt_every=3")
    train(family, run, data, "--train.max_steps=9", "--run.ckpt_every=3", "--train.resume=auto")
    assert events(run, "start")[1]["resumed_from"].endswith("step_00000006")
    assert events(run, "end")[-1]["step"] == 9
    logged = [r for r in read_metrics(run) if "loss_D" in r]
    assert logged and all(r["loss_D"] is not None and r["loss_G"] is not None for r in logged)
    out = tmp_path / "grid.png"
    if family == "cgan":  # one row per requested class
        run_here(["dist_gan.sample", str(run), "--classes=0,1,2", "--per_class=5", f"--out={out}"], capsys)
        assert Image.open(out).size == (5 * 28 + 6 * 2, 3 * 28 + 4 * 2)
    elif family == "vaegan":  # rows of inputs, then of their reconstructions
        assert {"kl", "recon"} <= set(logged[-1])
        run_here(["dist_gan.sample", str(run), "--reconstruct", "--n=16", f"--out={out}"], capsys)
        assert Image.open(out).size == (8 * 28 + 9 * 2, 4 * 28 + 5 * 2)
    else:
        run_here(["dist_gan.sample", str(run), "--n=16", f"--out={out}"], capsys)
        assert Image.open(out).size == (4 * 28 + 5 * 2, 4 * 28 + 5 * 2)


@pytest.mark.tier("multiprocess")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_on_two_processes(tmp_path, data, family):
    run = tmp_path / family
    train(family, run, data, "--train.max_steps=4", "--run.ckpt_every=4", launcher=CPU_DDP)
    assert events(run, "start")[0]["world_size"] == 2
    check = events(run, "checkpoint")[-1]["replicas_identical"]
    assert all(check.values()) and ({"G", "D", "E"} if family == "vaegan" else {"G", "D"}) == set(check)


@pytest.mark.tier("multiprocess")
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_discriminator_trains_on_two_processes(tmp_path, data, cell):
    """The RNN-GAN with the discriminator that reads the rows in order (not the config's default)."""
    run = tmp_path / cell
    train("rnngan", run, data, "--model.discriminator.arch=rnn", f"--model.discriminator.cell={cell}",
          f"--model.generator.cell={cell}", "--train.max_steps=4", "--run.ckpt_every=4", launcher=CPU_DDP)
    assert events(run, "start")[0]["world_size"] == 2
    assert events(run, "checkpoint")[-1]["replicas_identical"] == {"G": True, "D": True}
    assert all(r["loss_D"] is not None for r in read_metrics(run) if "loss_D" in r)


def test_improved_gan_techniques_with_a_vaegan_resume_bit_exact(tmp_path, data):
    """Label smoothing, feature matching, minibatch stddev and historical averaging on the VAE-GAN
    (so the encoder and the averages are checkpointed too): 3 + 3 steps == 6 steps, bit for bit."""
    tricks = ["--loss.label_smoothing=0.1", "--loss.feature_matching=1.0",
              "--loss.historical_averaging=0.01", "--model.discriminator.mbstd=true", "--run.ckpt_every=3"]
    train("vaegan", tmp_path / "straight", data, *tricks, "--train.max_steps=6")
    train("vaegan", tmp_path / "split", data, *tricks, "--train.max_steps=3")
    train("vaegan", tmp_path / "split", data, *tricks, "--train.max_steps=6", "--train.resume=auto")
    logged = [r for r in read_metrics(tmp_path / "straight") if "loss_D" in r][-1]
    assert {"feature_matching", "hist_avg", "hist_avg_G", "kl", "recon"} <= set(logged)
    a, b = (tmp_path / name / "checkpoints" / "step_00000006" for name in ("straight", "split"))
    for name in ("G/model.safetensors", "G/model_1.safetensors", "D/model.safetensors",
                 "encoder.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    averages = [torch.load(p / "trainer_state.pt", weights_only=True)["loss"]["terms"]["hist_avg"]["D"]["count"] for p in (a, b)]
    assert averages == [6, 6]


def test_conditional_samples_are_of_the_requested_class(tmp_path, data, reference_classifier):
    """After a short training the reference classifier reads the requested digit far above chance."""
    from dist_gan.tools.generate import by_class, generator_from_checkpoint

    run = tmp_path / "cgan"
    run_cli(["dist_gan.train", "configs/mnist_cgan.yaml", f"--run.dir={run}", *data,
             "--train.max_steps=500", "--run.ckpt_every=500", "--model.generator.width=32",
             "--model.discriminator.width=32", "--run.log_every=50"])
    classifier, _ = reference_classifier
    generator, _ = generator_from_checkpoint(run)
    images = by_class(generator, list(range(10)), 50, seed=1)
    with torch.no_grad():
        _, logits = classifier.embed(images)
    wanted = torch.arange(10).repeat_interleave(50)
    accuracy = (logits.argmax(1) == wanted).float().mean().item()
    assert accuracy > 0.4, f"samples match the requested class {accuracy:.0%} of the time (chance 10%)"
