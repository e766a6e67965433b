"""Speed options (issue #5): channels-last activations, bf16 autocast, torch.compile of the
networks, data staging and the optimizer -- each must leave the objective what it was."""

import pytest
import torch

import pyro

from pyro_srvae import make_elbo
from pyro_srvae.model import networks
from pyro_srvae.cli import build_train_parser, config_from_args, resume_overrides
from pyro_srvae.data.batching import DeviceImages, dequantize
from pyro_srvae.training.config import TrainConfig
from pyro_srvae.training.factory import build_model
from pyro_srvae.training.loop import train
from pyro_srvae.training.objective import ElboObjective, make_optimizer, training_mode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(model="srvae", guide="full", hidden=4):
    pyro.clear_param_store()
    torch.manual_seed(0)
    return build_model(TrainConfig(model=model, guide=guide, hidden=hidden, z_dim=4, u_dim=3), (1, 12, 12))


def _loss(model, x, precision="fp32", seed=1):
    elbo = make_elbo("meanfield")
    with training_mode(model, elbo):
        torch.manual_seed(seed)
        return ElboObjective(model, elbo, precision)(x)


@pytest.fixture
def x():
    torch.manual_seed(3)
    return dequantize(torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8))


@pytest.fixture
def layout():
    yield
    networks.set_channels_last(True)


@pytest.mark.parametrize("model_name, guide", [("vae", "simple"), ("srvae", "simple"), ("srvae", "full")])
def test_channels_last_activations_give_the_same_loss(x, layout, model_name, guide):
    model = _model(model_name, guide)
    networks.set_channels_last(False)
    reference = _loss(model, x)
    networks.set_channels_last(True)
    assert _loss(model, x).item() == pytest.approx(reference.item(), rel=1e-5)
    # the parameters keep torch's default layout: Pyro's param store would copy them otherwise
    assert all(p.is_contiguous() for p in model.parameters())


def test_decoders_compute_in_channels_last(layout):
    decoder = networks.ImageDecoder(4, (1, 12, 12), hidden=4)
    networks.set_channels_last(True)
    hidden = decoder.stage1(torch.nn.functional.interpolate(
        networks._conv_input(decoder.project(torch.randn(2, 4)).view(-1, 8, 3, 3)), size=(6, 6)))  # fmt: skip
    assert hidden.is_contiguous(memory_format=torch.channels_last) and not hidden.is_contiguous()
    networks.set_channels_last(False)
    assert decoder(torch.randn(2, 4)).is_contiguous()


@pytest.mark.parametrize("model_name, guide", [("vae", "simple"), ("srvae", "full")])
def test_bf16_networks_keep_a_float32_loss_close_to_fp32(x, model_name, guide):
    model = _model(model_name, guide)
    reference = _loss(model, x, "fp32")
    loss = _loss(model, x, "bf16")
    assert loss.dtype == torch.float32
    # bf16 keeps ~3 significant digits inside the networks; the loss (~1e3 nats) moves by far less than 1%
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)
    assert loss.item() != reference.item()  # the networks did run in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loc, scale = model.encoder_u(torch.rand(2, 1, 6, 6)) if model_name == "srvae" else model.encoder_z(x)
        assert loc.dtype == scale.dtype == torch.float32  # networks.float32_outputs


def test_bf16_training_lowers_the_loss_and_resumes_in_fp32(tmp_path):
    result = train(
        TrainConfig(guide="full", hidden=4, epochs=2, train_limit=256, eval_limit=16, eval_samples=2,
                    batch_size=32, precision="bf16", figures=False, out=str(tmp_path)),
        progress=False, log=lambda message: None,
    )  # fmt: skip
    epochs = result.metrics["epochs"]
    assert epochs[1]["train_objective_bpd"] < epochs[0]["train_objective_bpd"]
    assert result.metrics["config"]["precision"] == "bf16"
    resumed = train(resume=result.checkpoint, epochs=3, precision="fp32", progress=False, log=lambda m: None)
    assert resumed.metrics["config"]["precision"] == "fp32" and len(resumed.metrics["epochs"]) == 3


def test_compiled_networks_compute_the_same_loss_under_the_same_names(x):
    pytest.importorskip("torch._inductor")
    model = _model("vae", "simple")
    names = list(model.state_dict())
    reference = _loss(model, x)
    model.compile_networks(backend="aot_eager")  # the inductor backend needs a C++ toolchain; same graph capture
    assert _loss(model, x).item() == pytest.approx(reference.item(), rel=1e-5)
    assert list(model.state_dict()) == names
    elbo = make_elbo("meanfield")
    with training_mode(model, elbo):
        ElboObjective(model, elbo)(x).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_networks_are_the_encoders_and_decoders():
    model = _model("srvae", "full")
    # q(u|y) is a vector's encoder; q(z|x,y,u) and p(z|y,u) are the z map's (the srVAE's default)
    assert [type(n).__name__ for n in (model.encoder_u, model.encoder_z, model.prior_z)] == [
        "GaussianEncoder", "SpatialGaussianEncoder", "SpatialGaussianEncoder"]
    assert {type(n).__name__ for n in model.networks()} == {
        "GaussianEncoder", "SpatialGaussianEncoder", "ImageDecoder", "SuperResolutionDecoder"}
    assert len(model.networks()) == 5  # q(u|y), q(z|x,y,u), p(y|u), p(z|y,u), p(x|y,z,u)


@pytest.mark.parametrize("resident", [True, False])
def test_device_images_serve_the_indexed_batches(resident):
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    source = DeviceImages(images, "cpu", resident=resident)
    assert source.resident is resident and len(source) == 10
    first = source.batch(torch.tensor([3, 1, 4]))
    later = [source.batch(torch.tensor([i, 9 - i])) for i in range(3)]  # reuses the staging buffers
    assert torch.equal(first, images[[3, 1, 4]])  # not overwritten by later batches
    assert all(torch.equal(b, images[[i, 9 - i]]) for i, b in enumerate(later))


@cuda
def test_streamed_images_are_pinned_and_copied_to_the_gpu():
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    source = DeviceImages(images, "cuda", resident=False)
    assert source.images.is_pinned()
    batches = [source.batch(torch.arange(i, i + 8)) for i in range(0, 64, 8)]
    torch.cuda.synchronize()
    assert all(b.is_cuda and torch.equal(b.cpu(), images[i * 8 : i * 8 + 8]) for i, b in enumerate(batches))


def test_the_fused_optimizer_takes_the_steps_of_the_plain_one():
    model = _model("vae", "simple")
    twin = _model("vae", "simple")
    fused, plain = make_optimizer(model, 1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)
    assert fused.defaults["fused"]  # torch >= 2.4 has a fused CPU Adam
    for step in range(3):
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.full_like(a, 0.1 * (step + 1))
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


@cuda
def test_the_gpu_optimizer_is_fused():
    model = _model("vae", "simple").cuda()
    assert make_optimizer(model, 1e-3).defaults["fused"]


def test_cli_flags_reach_the_config():
    parser = build_train_parser()
    config = config_from_args(parser, parser.parse_args(["--precision", "bf16", "--compile"]))
    assert config.precision == "bf16" and config.compile is True
    overrides = resume_overrides(parser.parse_args(["--resume", "c.pt", "--precision", "bf16", "--compile"]))
    assert overrides["precision"] == "bf16" and overrides["compile"] is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])
