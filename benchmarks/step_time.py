"""Time a Pyro training step against a hand-written PyTorch step of the same ELBO.

For each variant (vae; srvae simple/full) x prior (gaussian/mog) x ELBO (trace,
meanfield), two copies of the same networks train side by side: one through the
library's training step (a Pyro ELBO builds loss and gradients), one through
``torch_reference.reference_loss`` (the same ELBO written by hand). Before timing, both
losses are computed under the same RNG state: ``loss_match`` says whether Pyro built the
same number as the hand-written formula.

Paired design. The two steps alternate in one run, and each adjacent (pyro, torch) step
is one *pair*; pyro runs first in even pairs and torch first in odd ones, so neither side
always gets the cache (or the clock boost) of going first. A record's ``ratio`` is the
median over pairs of pyro_time / torch_time, and ``overhead_ms`` the median over pairs of
pyro_ms - torch_ms (what Pyro adds to a step, in milliseconds). Why pairs: a slow moment
of the machine (another process, a frequency change) lasts across both members of a pair
and cancels in its ratio; one that hits a single step spoils one pair's ratio, which the
median ignores. The ratio of the two separate medians has neither property: the medians
are taken over different steps, so a slowdown that covers part of the run can put one
side's median among the slow steps and the other's among the fast ones, and one such
moment decides the record (see tests/test_benchmarks.py for such a run).

``ratio_low``, ``ratio_high``: a distribution-free 95% confidence interval for the median
paired ratio, from order statistics: with the n ratios sorted, the interval runs from the
k-th smallest to the k-th largest, k the largest rank for which a binomial(n, 1/2)
variable falls below k with probability at most 2.5% (coverage >= 95%, for any
distribution of the ratios, as long as the pairs are independent). With fewer than 6
pairs no such rank exists; the interval is then the min and max of the ratios and covers
the median with only 1 - 2^(1-n) probability (``ratio_coverage`` holds the coverage of the
interval reported, ``pairs`` the n). ``pyro_ms`` and ``torch_ms`` are each side's own
median step time, ``images_per_s`` the batch over Pyro's median.

Budget: ``--quick`` times 200 pairs per record after 10 warm-up pairs; ranks 86 and 115 of 200
bound the median. It is sized for back-to-back ``--quick`` runs on a quiet machine to agree on every
record's ratio within 0.05: at 50 pairs three such runs on a 2-core VM spread by up to 0.078, at 100
by 0.070, at 200 by 0.0497 (docs/performance.md; the spread shrinks as the square root of the pairs,
the step-to-step jitter of a shared machine being what is left after pairing). A ``--quick`` run took
181 s there (12 records x 210 pairs of 27-53 ms steps); the default, 400 pairs after 10 (ranks 180
and 221), about twice that.

    python benchmarks/step_time.py --quick          # about 3 minutes on a 2-core CPU
    python benchmarks/step_time.py --json           # last line: a JSON list of records
    python benchmarks/step_time.py --device cuda --arch densenet --hidden 32 --shape 3,32,32 \
        --precision bf16 --compile                  # the CIFAR-10-shaped GPU configuration

``--shape C,H,W`` times random uint8 images of that shape (no download) instead of the
embedded Fashion-MNIST. ``--precision``, ``--compile`` and the optimizer (fused Adam on a
GPU, ``pyro_srvae.training.objective.make_optimizer``) apply to both steps alike, so the ratio
measures Pyro's share and the absolute times what the options buy.
"""

import argparse
import copy
import json
import math
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
from pyro_srvae.model.networks import ARCHS  # noqa: E402
from pyro_srvae.data.batching import dequantize  # noqa: E402
from pyro_srvae.training.distributed import DistributedContext  # noqa: E402
from pyro_srvae.training.config import PRECISIONS, TrainConfig  # noqa: E402
from pyro_srvae.training.factory import build_model  # noqa: E402
from pyro_srvae.training.objective import (  # noqa: E402
    DataParallelElbo,
    make_optimizer,
    network_precision,
    training_mode,
    training_step,
)
from pyro_srvae.utils.devices import resolve_device  # noqa: E402

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


def median_interval(values, confidence=0.95):
    """The median of ``values`` and a distribution-free interval for it, from order statistics.

    Returns ``(median, low, high, coverage)``. With the n values sorted, ``low`` is the k-th
    smallest and ``high`` the k-th largest, k the largest rank with
    P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2, so that [low, high] covers the
    population median with probability ``coverage`` = 1 - 2 P(Binomial(n, 1/2) <= k - 1)
    >= ``confidence``. When n is too small for any such k (n < 6 at 95%), ``low`` and
    ``high`` are the min and max and ``coverage`` = 1 - 2^(1-n) falls short of ``confidence``.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    tail = (1 - confidence) / 2
    k, cdf = 0, 0.0  # cdf = P(B <= k - 1) for the current k
    while True:
        next_cdf = cdf + math.comb(n, k) / 2**n  # P(B <= k)
        if next_cdf > tail or k + 1 > (n + 1) // 2:
            break
        k, cdf = k + 1, next_cdf
    if k == 0:  # too few values: report the range, whose coverage is below `confidence`
        k, cdf = 1, 1 / 2**n
    return statistics.median(ordered), ordered[k - 1], ordered[n - k], 1 - 2 * cdf


def paired_ratio_summary(pyro_times, torch_times, confidence=0.95):
    """Summarise paired step times (seconds; ``pyro_times[i]`` and ``torch_times[i]`` ran back to back).

    ``ratio`` is the median of the paired ratios pyro / torch, ``ratio_low`` and ``ratio_high``
    its order-statistic interval (``median_interval``), ``overhead_ms`` the median of the
    paired differences pyro - torch in milliseconds; ``pyro_ms`` and ``torch_ms`` are each
    side's own median, in milliseconds. Not rounded.
    """
    if len(pyro_times) != len(torch_times) or not pyro_times:
        raise ValueError(f"need equally many paired times, got {len(pyro_times)} and {len(torch_times)}")
    pairs = list(zip(pyro_times, torch_times))
    ratio, low, high, coverage = median_interval([p / t for p, t in pairs], confidence)
    return {
        "pyro_ms": 1000 * statistics.median(pyro_times),
        "torch_ms": 1000 * statistics.median(torch_times),
        "ratio": ratio,
        "ratio_low": low,
        "ratio_high": high,
        "ratio_coverage": coverage,
        "overhead_ms": 1000 * statistics.median([p - t for p, t in pairs]),
        "pairs": len(pairs),
    }


def _alternate(pyro_step, torch_step, batches, args, device):
    """Run the two steps in adjacent pairs; return their times (seconds) after the warm-up pairs.

    Pyro goes first in even pairs and torch in odd ones, so neither always runs on a warmer
    cache. ``pyro_times[i]`` and ``torch_times[i]`` are the two members of timed pair i.
    """
    pyro_times, torch_times = [], []
    for i in range(args.warmup + args.steps):
        x = batches[i % len(batches)]
        order = [(pyro_step, pyro_times), (torch_step, torch_times)]
        for step, times in order if i % 2 == 0 else order[::-1]:
            _synchronize(device)
            start = time.perf_counter()
            step(x)
            _synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    return pyro_times, torch_times


def benchmark_variant(model_name, guide, prior, elbo_name, images, args, device):
    config = TrainConfig(
        model=model_name, guide=guide or "simple", prior=prior, elbo=elbo_name, hidden=args.hidden, seed=0,
        arch=args.arch, precision=args.precision,
    ).resolve_defaults()  # the main job's recipe for what is not given here
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

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with training_mode(pyro_model, elbo):
        if args.register_every_step:  # the per-call pyro.module registration that SVI needs
            pyro_model.pyro_registration = True
        pyro_times, torch_times = _alternate(pyro_step, torch_step, batches, args, device)
    summary = paired_ratio_summary(pyro_times, torch_times)
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
        "pyro_ms": round(summary["pyro_ms"], 3),
        "torch_ms": round(summary["torch_ms"], 3),
        "ratio": round(summary["ratio"], 4),  # the median paired ratio, not pyro_ms / torch_ms
        "ratio_low": round(summary["ratio_low"], 4),
        "ratio_high": round(summary["ratio_high"], 4),
        "ratio_coverage": round(summary["ratio_coverage"], 4),
        "overhead_ms": round(summary["overhead_ms"], 3),
        "pairs": summary["pairs"],
        "images_per_s": round(args.batch_size / (summary["pyro_ms"] / 1000), 1),
        "peak_mem_mb": round(peak_memory_mb(device), 1),
        "loss_match": loss_match,
    }




def _interval(record):
    return f"[{record['ratio_low']:.3f},{record['ratio_high']:.3f}]"


def _name(record):
    return " ".join(str(record[key]) for key in ("model", "guide", "prior", "elbo") if record[key] is not None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs (200): about 3 minutes on a 2-core CPU")
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list on the last line")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--hidden", type=int, default=None, help="[the main job's, training.config.RECIPES]")
    parser.add_argument("--steps", type=int, default=None, help="timed (pyro, torch) pairs per record [400, quick: 200]")
    parser.add_argument("--warmup", type=int, default=None, help="untimed pairs first [10]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--arch", default="small", choices=ARCHS)
    parser.add_argument("--shape", type=image_shape, default=None, metavar="C,H,W", help="random images of this shape")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks of both steps")
    parser.add_argument(
        "--register-every-step", action="store_true", help="keep pyro.module registration on every call (as SVI)"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (200 if args.quick else 400)
    args.warmup = args.warmup if args.warmup is not None else 10
    device = resolve_device(args.device)
    images = benchmark_images(2048, args.shape).to(device)

    records = []
    header = (
        f"{'model':6} {'guide':6} {'prior':8} {'elbo':9} {'pyro ms':>8} {'torch ms':>8} {'ratio':>6} "
        f"{'95% interval':>15} {'+ms':>8} {'img/s':>7} match"
    )
    print(
        f"device {device}, batch {args.batch_size}, images {tuple(images.shape[1:])}, arch {args.arch}, "
        f"precision {args.precision}, compile {args.compile}, torch threads {torch.get_num_threads()}, "
        f"{args.steps} timed pairs after {args.warmup}; ratio: median of the paired pyro/torch ratios, "
        f"+ms: median paired pyro - torch"
    )
    print(header)
    for model_name, guide in VARIANTS:
        for prior in PRIORS:
            for elbo_name in ELBOS:
                r = benchmark_variant(model_name, guide, prior, elbo_name, images, args, device)
                records.append(r)
                print(
                    f"{r['model']:6} {str(r['guide'] or '-'):6} {r['prior']:8} {r['elbo']:9} {r['pyro_ms']:8.2f} "
                    f"{r['torch_ms']:8.2f} {r['ratio']:6.3f} {_interval(r):>15} {r['overhead_ms']:8.2f} "
                    f"{r['images_per_s']:7.0f} {r['loss_match']}",
                    flush=True,
                )
    worst = max(records, key=lambda r: r["ratio"])
    enough = min(r["ratio_coverage"] for r in records) >= 0.95
    note = "95% interval" if enough else "min-max of the paired ratios: too few pairs for a 95% interval"
    print(
        f"worst ratio {worst['ratio']:.3f} {_interval(worst)} ({note}; {_name(worst)}); "
        f"all losses match: {all(r['loss_match'] for r in records)}"
    )
    if args.json:
        print(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
