"""Throughput and memory of the importance-weighted bits/dim (K = 1000 by default).

    python benchmarks/eval_time.py --quick     # 32 test images, under a minute on a 2-core CPU
    python benchmarks/eval_time.py --num-images 2000 --json
    python benchmarks/eval_time.py --compare-layouts   # channels-last vs NCHW activations, same run
    python benchmarks/eval_time.py --device cuda --arch densenet --hidden 32 --shape 3,32,32

Times :func:`pyro_srvae.evaluate_model` (log-weights for K importance samples per image,
vectorized over samples in chunks) on an untrained model of the default size: the
cost of the estimate does not depend on the weights.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import pyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_images, image_shape, peak_memory_mb  # noqa: E402

from pyro_srvae import evaluate_model  # noqa: E402
from pyro_srvae.model import networks  # noqa: E402
from pyro_srvae.training.config import TrainConfig  # noqa: E402
from pyro_srvae.training.factory import build_model  # noqa: E402
from pyro_srvae.utils.devices import resolve_device  # noqa: E402

VARIANTS = [("vae", "simple"), ("srvae", "simple"), ("srvae", "full")]






def _time_evaluation(model, images, args, batch_size, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = evaluate_model(
        model, images, elbo_samples=args.samples, iw_samples=args.samples, batch_size=batch_size, device=device,
        super_resolution=False,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 test images")
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list on the last line")
    parser.add_argument("--num-images", type=int, default=None, help="test images [256, quick: 32]")
    parser.add_argument("--samples", type=int, default=1000, help="importance samples K per image")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch [chosen from K]")
    parser.add_argument("--hidden", type=int, default=None, help="[the main job's, training.config.RECIPES]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--arch", default="small", choices=networks.ARCHS)
    parser.add_argument("--shape", type=image_shape, default=None, metavar="C,H,W", help="random images of this shape")
    parser.add_argument(
        "--compare-layouts", action="store_true",
        help="time each model with channels-last and with NCHW activations, alternating, in one run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    num_images = args.num_images or (32 if args.quick else 256)
    device = resolve_device(args.device)
    images = benchmark_images(num_images, args.shape, split="test")
    batch_size = args.batch_size or max(1, 4096 // args.samples)

    print(f"device {device}, {num_images} images, K = {args.samples}, batch {batch_size}, threads {torch.get_num_threads()}")
    records = []
    for model_name, guide in VARIANTS:
        pyro.clear_param_store()
        torch.manual_seed(0)
        config = TrainConfig(model=model_name, guide=guide, hidden=args.hidden, arch=args.arch)
        model = build_model(config, images.shape[1:]).to(device)
        layout_seconds = {}
        if args.compare_layouts:  # alternate the layouts, twice each, keep each one's faster run
            for channels_last in (False, True, False, True):
                networks.set_channels_last(channels_last)
                seconds, _ = _time_evaluation(model, images, args, batch_size, device)
                key = "channels_last" if channels_last else "nchw"
                layout_seconds[key] = min(seconds, layout_seconds.get(key, float("inf")))
            networks.set_channels_last(True)
        seconds, result = _time_evaluation(model, images, args, batch_size, device)
        record = {
            "model": model_name,
            "guide": guide if model_name == "srvae" else None,
            "device": str(device),
            "iw_samples": args.samples,
            "num_images": num_images,
            "seconds": round(seconds, 3),
            "images_per_s": round(num_images / seconds, 2),
            "image_samples_per_s": round(num_images * args.samples / seconds, 1),
            "peak_mem_mb": round(peak_memory_mb(device), 1),
            "iw_bpd": round(result["iw_bpd"], 4),
        }
        if layout_seconds:
            record["nchw_seconds"] = round(layout_seconds["nchw"], 6)
            record["channels_last_seconds"] = round(layout_seconds["channels_last"], 6)
            record["channels_last_speedup"] = round(layout_seconds["nchw"] / layout_seconds["channels_last"], 3)
        records.append(record)
        print(
            f"{model_name:6} {str(record['guide'] or '-'):6} {record['images_per_s']:8.2f} images/s "
            f"{record['image_samples_per_s']:10.0f} image-samples/s  peak {record['peak_mem_mb']:.0f} MB",
            flush=True,
        )
        if layout_seconds:
            print(f"{'':13} channels-last activations {record['channels_last_speedup']:.2f}x faster than NCHW")
    if args.json:
        print(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
