"""Time one Adam step on a model's parameters: per-tensor loop, foreach, and fused.

    python benchmarks/optimizer_time.py                   # the default full-guide srVAE, CPU
    python benchmarks/optimizer_time.py --device cuda --arch densenet --hidden 32 --shape 3,32,32

The three optimizers step the same parameters with the same gradients, in turns, so
machine noise hits all alike; the figures are medians. ``pyro_srvae.training.objective.make_optimizer``
picks the fused one.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import image_shape  # noqa: E402

from pyro_srvae.model.networks import ARCHS  # noqa: E402
from pyro_srvae.training.config import TrainConfig  # noqa: E402
from pyro_srvae.training.factory import build_model  # noqa: E402
from pyro_srvae.utils.devices import resolve_device  # noqa: E402

VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default="srvae", choices=["vae", "srvae"])
    parser.add_argument("--hidden", type=int, default=None, help="[the main job's, training.config.RECIPES]")
    parser.add_argument("--arch", default="small", choices=ARCHS)
    parser.add_argument("--shape", type=image_shape, default=(1, 28, 28), metavar="C,H,W")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", action="store_true", help="print the record as JSON on the last line")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    pyro.clear_param_store()
    torch.manual_seed(0)
    config = TrainConfig(model=args.model, guide="full", hidden=args.hidden, arch=args.arch)
    model = build_model(config, args.shape).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {name: torch.optim.Adam(params, lr=1e-6, **options) for name, options in VARIANTS.items()}
    times = {name: [] for name in optimizers}
    for _ in range(args.steps):
        for name, optimizer in optimizers.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    record = {
        "device": str(device),
        "tensors": len(params),
        "parameters": sum(p.numel() for p in params),
        **{f"{name}_ms": round(value, 4) for name, value in ms.items()},
        "fused_speedup": round(ms["loop"] / ms["fused"], 3),
    }
    print(
        f"device {device}, {record['tensors']} tensors, {record['parameters']} parameters: "
        + ", ".join(f"{name} {value:.3f} ms" for name, value in ms.items())
        + f"; fused {record['fused_speedup']:.2f}x faster than the loop"
    )
    if args.json:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
