"""Ablations of the levers that make z carry the super-resolution's ambiguity, on a validation split.

Each configuration trains the main job (``examples/train_srvae.py --guide full`` and its budget)
on the first 9,000 of the 10,000 training images of fashion-mnist-mini, with the given flags,
and is scored on the last 1,000 training images, which it never saw: a validation split, so that
the choice of the default never looks at the test set (docs/results.md, "What z carries").
The test set is scored once per chosen recipe, by the main job itself.

    python scripts/latent_ablation.py --name free-bits-0.25 --seeds 0 1 2 -- --free-bits 0.25

writes one JSON line per seed to ``runs/latent-ablation.jsonl`` (``--out``).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pyro_srvae.cli import build_train_parser, config_from_args
from pyro_srvae.data.batching import dequantize
from pyro_srvae.training.factory import load_split
from pyro_srvae.training.loop import evaluate_images, train

VALIDATION = 1000
KEYS = (
    "iw_bpd", "elbo_bpd", "sr_psnr", "sr_best_of_gain", "sr_draw_psnr", "sr_latent_share", "sr_latent_share_detail",
    "sr_bpd", "sr_bpd_baseline", "kl_z_bits", "kl_u_bits", "active_z", "active_u",
)  # fmt: skip


@torch.no_grad()
def factor_share(model, images, limit=256):
    """tr(W W^T) / tr(W W^T + diag(sigma^2)) of p(z|y,u) at q(u|y)'s mean, over ``limit`` images: the
    part of z's prior variance that varies together over the map (``--z-prior-rank``). The images are
    dequantized as the model saw them in training, (k + u) / 256 (rows before stop 33 read k / 255)."""
    x = model.to_network_units(dequantize(images[:limit], generator=torch.Generator().manual_seed(0)))
    y = model.downscale(x)
    _, scale, factor = model.z_prior_parameters(y, model.encoder_u(y)[0])
    coherent = factor.square().sum((-1, -2))
    return (coherent / (coherent + scale.square().sum(-1))).mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/latent-ablation.jsonl")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="train flags after --")
    args = parser.parse_args(argv)
    flags = [f for f in args.flags if f != "--"]
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            train_parser = build_train_parser()
            train_args = train_parser.parse_args(
                ["--guide", "full", "--seed", str(seed), "--out", out, "--no-figures", "--eval-limit", "64", *flags]
            )
            config = config_from_args(train_parser, train_args)
            full = load_split(config, "train")
            config.train_limit = len(full) - VALIDATION
            started = time.time()
            # train() also scores the first 64 test images (--eval-limit 64); nothing here reads them.
            result = train(config, progress=False, log=lambda *a, **k: None)
            model = result.model
            seconds = time.time() - started
            metrics = evaluate_images(model, config, full.images[:-VALIDATION], full.images[-VALIDATION:], "cpu")
        row = {"name": args.name, "flags": flags, "seed": seed, "train_seconds": round(seconds, 1),
               "skipped_updates": result.metrics.get("skipped_updates")}  # by the update guard (training.guard.UpdateGuard)
        row.update({key: metrics.get(key) for key in KEYS})
        row["coverage90_detail"] = metrics["sr_coverage"]["detail"]["0.9"]
        if getattr(model, "z_prior_rank", 0):
            row["z_prior_factor_share"] = factor_share(model, full.images[-VALIDATION:])
        row["coverage90_edges"] = metrics["sr_coverage"]["edges"]["0.9"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
