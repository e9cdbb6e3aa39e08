import pytest
import torch

from dist_gan.config import Config, NetConfig, load_config
from dist_gan.models import build_discriminator, build_generator
from dist_gan.models.base import stage_plan

pytestmark = pytest.mark.tier("unit")


def make(arch, resolution, channels, norm_g="batch", norm_d="none", sn=False, num_classes=0,
         mbstd=False, cell="gru"):
    config = Config()
    config.data.resolution, config.data.channels = resolution, channels
    config.model.z_dim, config.model.num_classes = 32, num_classes
    config.model.generator = NetConfig(arch=arch, width=8, norm=norm_g, spectral_norm=sn, cell=cell)
    config.model.discriminator = NetConfig(arch=arch, width=8, norm=norm_d, spectral_norm=sn,
                                           mbstd=mbstd, cell=cell)
    return build_generator(config), build_discriminator(config)


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "rnn"])
@pytest.mark.parametrize("resolution,channels", [(28, 1), (32, 3), (64, 3)])
def test_shapes(arch, resolution, channels):
    G, D = make(arch, resolution, channels)
    images = G(torch.randn(5, 32))
    assert images.shape == (5, channels, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert D(images).shape == (5,)


def test_stage_plan():
    assert stage_plan(28, 64, "dcgan") == (7, [128, 64])
    assert stage_plan(64, 64, "dcgan") == (4, [512, 256, 128, 64])
    with pytest.raises(ValueError, match="resolution = 30.*as the dcgan networks need"):
        stage_plan(30, 64, "dcgan")
    with pytest.raises(ValueError, match="as the stylegan2 networks need"):  # the caller's, by name
        stage_plan(30, 1, "stylegan2")


@pytest.mark.parametrize("norm", ["layer", "instance", "none"])
def test_norm_choice_keeps_samples_independent(norm):
    """A critic for a per-sample gradient penalty must not mix samples in a batch."""
    _, D = make("dcgan", 28, 1, norm_d=norm)
    x = torch.randn(4, 1, 28, 28)
    alone = D(x[:1])
    assert torch.allclose(D(x)[:1], alone, atol=1e-5)


def test_spectral_norm_bounds_each_layer():
    _, D = make("dcgan", 28, 1, sn=True)
    D.train()
    for _ in range(30):  # power iterations converge during forward passes
        D(torch.randn(2, 1, 28, 28))
    head = D.head.linear
    assert hasattr(head, "parametrizations")
    sigma = torch.linalg.matrix_norm(head.weight.detach(), ord=2)
    assert sigma.item() == pytest.approx(1.0, rel=0.05)


def test_instance_norm_refused_for_mlp():
    with pytest.raises(ValueError, match="not available for fully connected"):
        make("mlp", 28, 1, norm_g="instance")


def test_shipped_config_networks_build():
    config = load_config("configs/mnist_dcgan.yaml")
    G, D = build_generator(config), build_discriminator(config)
    assert D(G(torch.randn(2, config.model.z_dim))).shape == (2,)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn_generator_emits_rows_and_discriminator_reads_them(cell):
    G, D = make("rnn", 28, 1, cell=cell)
    images = G(torch.randn(3, 32))
    assert images.shape == (3, 1, 28, 28)
    logits, features = D(images, return_features=True)
    assert logits.shape == (3,) and features.shape == (3, 64)  # mean and last output, hidden = 4 x width
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "rnn"])
def test_conditional_generator_and_projection_discriminator_use_the_label(arch):
    torch.manual_seed(0)
    G, D = make(arch, 28, 1, num_classes=10)
    z = torch.randn(4, 32).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    G.eval()
    images = G(z, labels)
    assert not torch.allclose(images[:4], images[4:])  # same z, other class: another image
    with torch.no_grad():  # projection: the logit moves with <embed(y), features>
        D.head.embed.weight.normal_()
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="class-conditional"):
        G(z)


def test_minibatch_stddev_feature_sees_the_batch():
    from dist_gan.models.base import minibatch_stddev

    same = torch.ones(8, 5)
    varied = torch.randn(8, 5)
    assert minibatch_stddev(same).shape == (8, 1)
    assert minibatch_stddev(same).max() < 1e-3 < minibatch_stddev(varied).min()
    assert minibatch_stddev(torch.randn(6, 5)).shape == (6, 1)  # group size divides the batch
    # with the feature, sample 0's logit depends on the rest of its batch; without, it does not
    x = torch.randn(4, 1, 28, 28)
    alike = torch.cat([x[:1]] * 4)
    for mbstd in (True, False):
        _, D = make("dcgan", 28, 1, mbstd=mbstd)
        if mbstd:
            with torch.no_grad():
                D.head.linear.weight[0, -1] = 1.0  # the weight of the stddev feature
        assert torch.allclose(D(x)[0], D(alike)[0], atol=1e-6) != mbstd


def test_encoder_gives_a_posterior_per_image():
    from dist_gan.models import build_encoder

    config = load_config("configs/mnist_wgangp.yaml", {"model.encoder.arch": "dcgan",
                                                        "model.encoder.width": 8})
    mu, logvar = build_encoder(config)(torch.randn(3, 1, 28, 28))
    assert mu.shape == logvar.shape == (3, config.model.z_dim)
    assert build_encoder(load_config("configs/mnist_wgangp.yaml")) is None


def test_networks_with_bf16_weights_take_and_give_fp32():
    """As DeepSpeed's bf16 leaves them: weights and buffers cast, inputs still fp32."""
    config = load_config("configs/mnist_cgan.yaml")  # BatchNorm in G; spectral norm, projection in D
    G, D = build_generator(config).to(torch.bfloat16), build_discriminator(config).to(torch.bfloat16)
    z, labels = torch.randn(4, config.model.z_dim), torch.arange(4)
    images = G(z, labels)
    logits, features = D(images, labels, return_features=True)
    assert images.dtype == logits.dtype == features.dtype == torch.float32
    x = images.detach().requires_grad_(True)  # the penalty's path: a gradient w.r.t. fp32 inputs
    (grad,) = torch.autograd.grad(D(x, labels).sum(), x)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
    fp32 = build_generator(config)
    assert fp32(z, labels).dtype == torch.float32  # fp32 weights: the hooks change nothing


def test_ema_of_bf16_weights_is_kept_in_fp32():
    from dist_gan.run.ema import EMA

    live = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(live, lambda step: 0.999)
    assert ema.model.weight.dtype == torch.float32
    before = ema.model.weight.clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live, step=10_000)  # a 0.001 step: in bf16 it would round away
    assert torch.allclose(ema.model.weight - before, torch.full_like(before, 0.001), atol=1e-4)


def test_ema_in_images_is_the_same_on_1_or_64_processes():
    from dist_gan.run.ema import ema_beta

    per_rank = 32
    for kimg, rampup in ((10.0, None), (10.0, 0.05), (0.5, None)):
        for step in (1, 50, 400, 5000):  # 64 ranks' step k has seen what 1 rank sees at step 64 k
            one = 1.0
            for k in range(64 * (step - 1) + 1, 64 * step + 1):
                one *= ema_beta(k, per_rank, kimg, rampup)
            many = ema_beta(step, per_rank * 64, kimg, rampup)
            tolerance = 1e-9 if rampup is None else 0.05  # the ramp moves within a step of 64
            assert abs(one - many) <= tolerance * max(many, 1e-3), (kimg, rampup, step, one, many)
    assert abs(ema_beta(10**6, 64, 10.0, 0.05) ** (10_000 / 64) - 0.5) < 1e-6  # half-life 10 kimg
    early = ema_beta(10, 64, 10.0, 0.05)  # 640 images seen: half-life capped at 32 images
    assert abs(early ** (32 / 64) - 0.5) < 1e-9


def test_ema_settings_are_validated_and_step_decay_stays_available():
    from dist_gan.config import ConfigError, load_config
    from dist_gan.run.ema import step_beta

    assert load_config(None, {"train.ema_decay": 0.9}).train.ema_decay == 0.9
    assert step_beta(0, 0.999) == 0.1 and step_beta(10**6, 0.999) == 0.999
    for key, value in (("train.ema_kimg", -1), ("train.ema_rampup", 0), ("train.ema_decay", 1.0)):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            load_config(None, {key: value})
