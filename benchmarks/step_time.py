"""Time a Pyro training step against a hand-written PyTorch step of the same ELBO.

For each variant (vae; srvae simple/full) x prior (gaussian/mog) x ELBO (trace,
meanfield), two copies of the same networks train side by side: one through the
library's training step (a Pyro ELBO builds loss and gradients), one through
``torch_reference.reference_loss`` (the same ELBO written by hand). Steps alternate
between the two in one run, so machine noise hits both alike; the figures are medians.
Before timing, both losses are computed under the same RNG state: ``loss_match``
says whether Pyro built the same number as the hand-written formula.

    python benchmarks/step_time.py --quick          # < 2 minutes on a 2-core CPU
    python benchmarks/step_time.py --json           # last line: a JSON list of records
    python benchmarks/step_time.py --device cuda --arch densenet --hidden 32 --shape 3,32,32 \
        --precision bf16 --compile                  # the CIFAR-10-shaped GPU configuration

``--shape C,H,W`` times random uint8 images of that shape (no download) instead of the
embedded Fashion-MNIST. ``--precision``, ``--compile`` and the optimizer (fused Adam on a
GPU, ``pyro_srvae.training.make_optimizer``) apply to both steps alike, so the ratio
measures Pyro's share and the absolute times what the options buy.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_images, image_shape, peak_memory_mb  # noqa: E402
from torch_reference import reference_loss  # noqa: E402

from pyro_srvae import make_elbo  # noqa: E402
from pyro_srvae.networks import ARCHS  # noqa: E402
from pyro_srvae.data import dequantize  # noqa: E402
from pyro_srvae.distributed import DistributedContext  # noqa: E402
from pyro_srvae.training import (  # noqa: E402
    PRECISIONS,
    DataParallelElbo,
    TrainConfig,
    build_model,
    make_optimizer,
    network_precision,
    resolve_device,
    training_mode,
    training_step,
)

VARIANTS = [("vae", None), ("srvae", "simple"), ("srvae", "full")]
PRIORS = ["gaussian", "mog"]
ELBOS = ["trace", "meanfield"]


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)




def _torch_step(model, optimizer, x, elbo_name, precision="fp32"):
    optimizer.zero_grad(set_to_none=True)
    with network_precision(x.device, precision):
        loss = reference_loss(model, x, elbo_name)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _alternate(pyro_step, torch_step, batches, args, device, pyro_times, torch_times):
    """Run the two steps in turns; record their times after the warm-up steps."""
    for i in range(args.warmup + args.steps):
        x = batches[i % len(batches)]
        # Alternate which goes first, so neither always runs on a warmer cache.
        order = [(pyro_step, pyro_times), (torch_step, torch_times)]
        for step, times in order if i % 2 == 0 else order[::-1]:
            _synchronize(device)
            start = time.perf_counter()
            step(x)
            _synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)


def benchmark_variant(model_name, guide, prior, elbo_name, images, args, device):
    config = TrainConfig(
        model=model_name, guide=guide or "simple", prior=prior, elbo=elbo_name, hidden=args.hidden, seed=0,
        arch=args.arch, precision=args.precision,
    )
    pyro.clear_param_store()
    torch.manual_seed(0)
    pyro_model = build_model(config, tuple(images.shape[1:])).to(device)
    torch_model = copy.deepcopy(pyro_model)
    if args.compile:
        pyro_model.compile_networks()
        torch_model.compile_networks()
    pyro_optimizer = make_optimizer(pyro_model, config.lr)
    torch_optimizer = make_optimizer(torch_model, config.lr)
    elbo = make_elbo(elbo_name)
    batches = [dequantize(images[torch.randint(len(images), (args.batch_size,))]) for _ in range(4)]

    # Same networks, same RNG state: Pyro's loss must equal the hand-written one.
    with torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(1)
        pyro_value = elbo.differentiable_loss(pyro_model.model, pyro_model.guide, batches[0])
        torch.manual_seed(1)
        torch_value = reference_loss(torch_model, batches[0], elbo_name)
    loss_match = bool(torch.allclose(pyro_value, torch_value, rtol=1e-5, atol=1e-3))

    # As pyro_srvae.train builds it: the objective once per run, the loop under training_mode.
    objective = DataParallelElbo(pyro_model, elbo, DistributedContext(), args.precision)

    def pyro_step(x):
        return training_step(pyro_model, pyro_optimizer, objective, x)

    def torch_step(x):
        return _torch_step(torch_model, torch_optimizer, x, elbo_name, args.precision)

    pyro_times, torch_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with training_mode(pyro_model, elbo):
        if args.register_every_step:  # the per-call pyro.module registration that SVI needs
            pyro_model.pyro_registration = True
        _alternate(pyro_step, torch_step, batches, args, device, pyro_times, torch_times)
    pyro_ms = 1000 * statistics.median(pyro_times)
    torch_ms = 1000 * statistics.median(torch_times)
    return {
        "model": model_name,
        "guide": guide,
        "prior": prior,
        "elbo": elbo_name,
        "device": str(device),
        "arch": args.arch,
        "image_shape": list(images.shape[1:]),
        "precision": args.precision,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "pyro_ms": round(pyro_ms, 3),
        "torch_ms": round(torch_ms, 3),
        "ratio": round(pyro_ms / torch_ms, 4),
        "images_per_s": round(args.batch_size / (pyro_ms / 1000), 1),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
        "loss_match": loss_match,
    }




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps: under 2 minutes on a 2-core CPU")
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list on the last line")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--hidden", type=int, default=TrainConfig.hidden)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant [60, quick: 12]")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first [10, quick: 3]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--arch", default="small", choices=ARCHS)
    parser.add_argument("--shape", type=image_shape, default=None, metavar="C,H,W", help="random images of this shape")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks of both steps")
    parser.add_argument(
        "--register-every-step", action="store_true", help="keep pyro.module registration on every call (as SVI)"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    device = resolve_device(args.device)
    images = benchmark_images(2048, args.shape).to(device)

    records = []
    header = f"{'model':6} {'guide':6} {'prior':8} {'elbo':9} {'pyro ms':>8} {'torch ms':>8} {'ratio':>6} {'img/s':>7} match"
    print(
        f"device {device}, batch {args.batch_size}, images {tuple(images.shape[1:])}, arch {args.arch}, "
        f"precision {args.precision}, compile {args.compile}, torch threads {torch.get_num_threads()}"
    )
    print(header)
    for model_name, guide in VARIANTS:
        for prior in PRIORS:
            for elbo_name in ELBOS:
                r = benchmark_variant(model_name, guide, prior, elbo_name, images, args, device)
                records.append(r)
                print(
                    f"{r['model']:6} {str(r['guide'] or '-'):6} {r['prior']:8} {r['elbo']:9} {r['pyro_ms']:8.2f} "
                    f"{r['torch_ms']:8.2f} {r['ratio']:6.3f} {r['images_per_s']:7.0f} {r['loss_match']}",
                    flush=True,
                )
    worst = max(r["ratio"] for r in records)
    print(f"worst ratio {worst:.3f}; all losses match: {all(r['loss_match'] for r in records)}")
    if args.json:
        print(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
