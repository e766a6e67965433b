"""The package's CPU ELU (:class:`pyro_srvae.model.networks.ELU`) against ``torch.nn.ELU``, one run.

    python benchmarks/elu_time.py                 # the photograph benchmark's model, 1 channel 32x32
    python benchmarks/elu_time.py --shape 3,32,32 --arch densenet --sr-arch densenet --hidden 32

Three figures, each a ratio of interleaved timings in the same process (these machines are
noisy): the activation alone (forward and backward on a ``(32, 64, 32, 32)`` tensor), whole
training steps of an srVAE (full guide, meanfield ELBO, Adam) whose ELU modules are
``torch.nn.ELU`` in one copy and the package's in the other, the same weights in both, and the
package's ELU against its previous form (three new tensors in the forward, three passes in the
backward; the same bits) at an evaluation's size, ``(1024, 64, 32, 32)`` channels-last, forward
only and forward with backward.
"""

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_images, image_shape  # noqa: E402

from pyro_srvae import make_elbo  # noqa: E402
from pyro_srvae.model import networks  # noqa: E402
from pyro_srvae.data.batching import dequantize  # noqa: E402
from pyro_srvae.training.config import TrainConfig  # noqa: E402
from pyro_srvae.training.factory import build_model  # noqa: E402
from pyro_srvae.training.objective import training_mode  # noqa: E402


def with_torch_elu(model):
    """A copy of ``model`` whose package ELU modules are ``torch.nn.ELU``."""
    copied = copy.deepcopy(model)
    copied.name = f"{model.name}_torch_elu"  # its own name in Pyro's param store
    copied._registration_checked = False
    for module in copied.modules():
        for name, child in module.named_children():
            if isinstance(child, networks.ELU):
                setattr(module, name, nn.ELU())
    return copied


class PreviousExpELU(torch.autograd.Function):
    """The package's ELU before it allocated only its output and used aten's elu_backward."""

    @staticmethod
    def forward(ctx, x):
        out = torch.maximum(x, torch.clamp(x, min=-30.0, max=0).exp_().sub_(1))
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (out,) = ctx.saved_tensors
        return grad_output * torch.clamp(out, max=0).add_(1)


def time_against_previous(repeats, batch):
    """Seconds per call of the previous and the current package ELU: forward without grad, and forward + backward."""
    x = torch.randn(batch, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    grad = torch.ones_like(x)
    functions = {"previous": PreviousExpELU.apply, "current": networks._ExpELU.apply}
    times = {(name, kind): 0.0 for name in functions for kind in ("forward", "forward + backward")}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            with torch.no_grad():
                function(x)
            times[name, "forward"] += time.perf_counter() - start
            leaf = x.detach().requires_grad_()
            start = time.perf_counter()
            function(leaf).backward(grad)
            times[name, "forward + backward"] += time.perf_counter() - start
    return {key: seconds / repeats for key, seconds in times.items()}


def time_activation(repeats):
    x = torch.randn(32, 64, 32, 32, requires_grad=True)
    grad = torch.ones_like(x)
    times = {"torch.nn.ELU": 0.0, "pyro_srvae ELU": 0.0}
    modules = {"torch.nn.ELU": nn.ELU(), "pyro_srvae ELU": networks.ELU()}
    for _ in range(repeats):
        for name, module in modules.items():
            start = time.perf_counter()
            module(x).backward(grad)
            times[name] += time.perf_counter() - start
    return {name: seconds / repeats for name, seconds in times.items()}


def time_steps(models, images, steps, batch_size):
    elbo = make_elbo("meanfield")
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-4) for name, model in models.items()}
    times = dict.fromkeys(models, 0.0)
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(training_mode(model, elbo))
        _interleaved_steps(models, optimizers, elbo, images, steps, batch_size, times)
    return {name: seconds / steps for name, seconds in times.items()}


def _interleaved_steps(models, optimizers, elbo, images, steps, batch_size, times):
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 2):  # two untimed warm-up steps
        x = dequantize(images[torch.randint(len(images), (batch_size,), generator=generator)])
        for name, model in models.items():
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            elbo.differentiable_loss(model.model, model.guide, x).backward()
            optimizers[name].step()
            if step >= 2:
                times[name] += time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=image_shape, default=(1, 32, 32), metavar="C,H,W")
    parser.add_argument("--arch", default="small", choices=networks.ARCHS)
    parser.add_argument("--sr-arch", default="densenet", choices=networks.ARCHS)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--sr-hidden", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-batch", type=int, default=1024, help="batch of the comparison with the previous ELU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    activation = time_activation(repeats=30)
    reference, package = activation["torch.nn.ELU"], activation["pyro_srvae ELU"]
    print(f"activation, forward + backward of (32, 64, 32, 32): torch.nn.ELU {reference * 1e3:.2f} ms, "
          f"pyro_srvae ELU {package * 1e3:.2f} ms, ratio {reference / package:.2f}")

    config = TrainConfig(guide="full", arch=args.arch, sr_arch=args.sr_arch, hidden=args.hidden, sr_hidden=args.sr_hidden)
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build_model(config, args.shape)
    models = {"torch.nn.ELU": with_torch_elu(model), "pyro_srvae ELU": model}
    images = benchmark_images(4 * args.batch_size, args.shape)
    steps = time_steps(models, images, args.steps, args.batch_size)
    reference, package = steps["torch.nn.ELU"], steps["pyro_srvae ELU"]
    print(f"training step, {args.shape} --arch {args.arch} --sr-arch {args.sr_arch} --hidden {args.hidden} "
          f"--sr-hidden {args.sr_hidden}, batch {args.batch_size}: torch.nn.ELU {reference * 1e3:.0f} ms, "
          f"pyro_srvae ELU {package * 1e3:.0f} ms, ratio {reference / package:.2f}")

    against = time_against_previous(repeats=5, batch=args.eval_batch)
    for kind in ("forward", "forward + backward"):
        previous, current = against["previous", kind], against["current", kind]
        print(f"against the previous package ELU, {kind} of ({args.eval_batch}, 64, 32, 32) channels-last: "
              f"previous {previous * 1e3:.1f} ms, current {current * 1e3:.1f} ms, ratio {previous / current:.2f}")


if __name__ == "__main__":
    main()
