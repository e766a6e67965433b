"""The paper's comparison, VAE vs srVAE (simple, full guide) x (Gaussian, MoG prior).

Gatopoulos, Stol & Tomczak (2020) report on CIFAR-10: VAE 3.51 vs srVAE 3.65 bits/dim
and FID 37.25 vs 29.95 -- similar likelihood, better samples. :func:`run_comparison`
tests that claim on the data at hand: it trains every cell of the grid

    {vae, srvae-simple, srvae-full} x {gaussian, mog}

under one :class:`Budget` and one seed, evaluates each (importance-weighted bits/dim
with K samples per test image, the ELBO from the same samples, super-resolution PSNR /
SSIM against bicubic, and ``fd``, the Fréchet distance of generated and test images in
the features of a classifier trained on the same data, :mod:`pyro_srvae.metrics.frechet`), and
writes

* ``OUT/results.json``: one row per cell (:data:`ROW_KEYS` and a few more);
* ``OUT/results.md``: the table, the paper's targets checked (:func:`check_targets`),
  and ``OUT/samples.png``, the models' samples side by side;
* ``OUT/cells/<cell>/``: each cell's training run (checkpoint, metrics, figures) and its
  ``row.json``.

Seed policy: every cell uses the same ``seed`` -- the same initial-weight seed, the same
order of training batches, the same dequantization noise and the same evaluation noise --
so the cells differ only by model, guide and prior.

A comparison is resumable: cells whose ``row.json`` exists are not run again, a cell
cut short resumes from its checkpoint, and ``OUT/comparison.json`` holds the settings
so that a directory is never filled with rows of two different budgets.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pyro
import torch

from .. import plots
from ..data.batching import dequantize
from ..data.datasets import load_dataset
from ..metrics import frechet
from ..metrics.likelihood import elbo_terms
from ..sr.loading import load_model
from ..training.checkpoint import load_checkpoint
from ..training.config import ConfigError, TrainConfig
from ..training.loop import train
from ..utils.devices import resolve_device
from ..utils.io import atomic_write_bytes, atomic_write_text

#: The grid, in the order of the table: (cell name, model, guide, prior).
CELLS = [
    (f"{model}{'-' + guide if guide else ''}-{prior}", model, guide, prior)
    for prior in ("gaussian", "mog")
    for model, guide in (("vae", None), ("srvae", "simple"), ("srvae", "full"))
]

CELL_NAMES = [name for name, *_ in CELLS]

#: The keys every row of ``results.json`` has (issue #4); rows carry a few more.
ROW_KEYS = ("model", "guide", "prior", "iw_bpd", "elbo_bpd", "sr_psnr", "bicubic_psnr", "sr_ssim", "fd", "epochs", "seconds")

#: What the latents carry, per cell (pyro_srvae.metrics.latents; the SR ones are None for the VAE).
LATENT_KEYS = ("kl_z_bits", "kl_u_bits", "active_z", "z_dim", "sr_latent_share", "sr_best_of_gain")

SETTINGS_FILE = "comparison.json"

ROW_FILE = "row.json"

FD_FLOOR_FILE = "fd-floor.json"

SAMPLES_FILE = "samples.pt"

#: Samples per model in the figure of results.md.
FIGURE_SAMPLES = 16


@dataclass
class Budget:
    """What every cell of the grid gets: training, evaluation and ``fd`` settings (the batch
    size and learning rate as when docs/results.md's grid was run, not the main job's).

    ``None`` limits mean the whole split. ``fd_samples=None`` generates as many images
    as there are test images (the reference set).
    """

    epochs: int
    hidden: int
    iw_samples: int
    batch_size: int = 64
    lr: float = 2e-3
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    sr_samples: int = 16
    fd_samples: Optional[int] = None
    classifier_epochs: int = frechet.DEFAULT_TRAINING["epochs"]
    classifier_train_limit: Optional[int] = None


#: ``default`` is the real experiment (``docs/results.md``): 10 epochs of the whole
#: training set, IW bits/dim with K = 1000 on the whole test set. Networks of width 8
#: make its 6 x 10^7 decoder passes of evaluation fit a CPU session (``--hidden``
#: changes it). ``quick`` runs the grid in about two and a half minutes on a 2-core CPU.
BUDGETS = {
    "default": Budget(epochs=10, hidden=8, iw_samples=1000),
    "quick": Budget(
        epochs=4, hidden=8, iw_samples=64, train_limit=None, eval_limit=500, sr_samples=8,
        classifier_epochs=2, classifier_train_limit=None,
    ),  # fmt: skip
}


@dataclass
class ComparisonSettings:
    """Everything that defines a comparison; ``OUT/comparison.json`` holds it."""

    budget: Budget
    dataset: str = "fashion-mnist-mini"
    data_dir: Optional[str] = None
    download: bool = False
    seed: int = 0
    likelihood: str = "gaussian"
    likelihood_components: int = 10
    arch: str = "small"
    x_given_y: str = "consistent"

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, out_dir):
        """The settings of the comparison in ``out_dir`` (from its ``comparison.json``)."""
        values = dict(json.loads((Path(out_dir) / SETTINGS_FILE).read_text())["settings"])
        values.setdefault("x_given_y", "spec")  # comparisons run before the option scored the spec's joint
        return cls(budget=Budget(**values.pop("budget")), **values)

    def identity(self):
        """The fields that make two comparisons' rows comparable (not the data's location)."""
        values = self.to_dict()
        del values["data_dir"], values["download"]
        return values


def cell_config(settings: ComparisonSettings, cell: str, out_dir, device="auto") -> TrainConfig:
    """The :class:`TrainConfig` of one cell of the grid."""
    try:
        _, model, guide, prior = CELLS[CELL_NAMES.index(cell)]
    except ValueError:
        raise ConfigError(f"unknown cell {cell!r}; expected one of {', '.join(CELL_NAMES)}") from None
    budget = settings.budget
    return TrainConfig(
        model=model, guide=guide or "simple", prior=prior, dataset=settings.dataset,
        data_dir=settings.data_dir, download=settings.download, epochs=budget.epochs,
        batch_size=budget.batch_size, hidden=budget.hidden, train_limit=budget.train_limit,
        eval_limit=budget.eval_limit, eval_samples=budget.iw_samples, sr_samples=budget.sr_samples,
        seed=settings.seed, likelihood=settings.likelihood, likelihood_components=settings.likelihood_components,
        arch=settings.arch, device=device, out=str(out_dir),
        x_given_y=settings.x_given_y if model == "srvae" else "consistent", lr=budget.lr,
        # The grid of docs/results.md was run with the spec's vector z read by the SR decoder's
        # first layer; it keeps that layout, so that its numbers stay those of the code.
        z_channels=0, z_injection="input",
    ).validate()  # fmt: skip


def _classifier_dir(out_dir):
    return Path(out_dir) / "fd-classifier"


def fd_classifier(settings: ComparisonSettings, out_dir, device, log=None):
    """The comparison's ``fd`` classifier, cached in ``out_dir/fd-classifier`` (trained on first use)."""
    budget = settings.budget
    return frechet.load_or_train_classifier(
        _classifier_dir(out_dir), settings.dataset, settings.seed, data_dir=settings.data_dir,
        epochs=budget.classifier_epochs, max_train_images=budget.classifier_train_limit, device=device, log=log,
    )  # fmt: skip


def comparison_test_images(settings: ComparisonSettings):
    """The uint8 test images every cell is evaluated on."""
    images = load_dataset(settings.dataset, "test", settings.data_dir).images
    limit = settings.budget.eval_limit
    return images if limit is None else images[:limit]


def run_cell(settings: ComparisonSettings, cell: str, out_dir, *, device="auto", inception=False,
             inception_weights=None, progress=False, log: Callable[[str], None] = print) -> dict:
    """Train and evaluate one cell into ``out_dir/cells/<cell>``; return (and write) its row.

    A cell with a checkpoint but no row (cut short) resumes from the checkpoint. With
    ``inception`` the row's ``inception_fid`` is the Inception FID from the local weights
    ``inception_weights`` (:func:`pyro_srvae.metrics.frechet.inception_fid`); otherwise it is None.
    """
    start = time.time()
    cell_dir = Path(out_dir) / "cells" / cell
    checkpoint = cell_dir / "checkpoint.pt"
    config = cell_config(settings, cell, cell_dir, device)
    cell_log = lambda message: log(f"[{cell}] {message}")  # noqa: E731
    if checkpoint.exists():
        previous = load_checkpoint(checkpoint).get("history", {}).get("wall_seconds", 0.0)
        start -= previous
        result = train(resume=checkpoint, progress=progress, log=cell_log, device=device, epochs=config.epochs)
    else:
        result = train(config, progress=progress, log=cell_log)
    model, test_metrics = result.model, result.metrics["test"]

    device = model.device
    classifier = fd_classifier(settings, out_dir, device, cell_log)
    test_images = comparison_test_images(settings)
    budget = settings.budget
    # One set of generated images serves fd and the Inception FID (what compute_fd would draw).
    generated = frechet.generate_images(model, budget.fd_samples or len(test_images), seed=settings.seed)
    fd = frechet.compute_fd(generated, test_images, classifier, num_samples=len(generated), seed=settings.seed)
    inception_fid = None
    if inception:
        inception_fid = frechet.inception_fid(test_images, generated, inception_weights, device=str(device))
    samples = frechet.generate_images(model, FIGURE_SAMPLES, seed=settings.seed)
    atomic_write_bytes(cell_dir / SAMPLES_FILE, lambda handle: torch.save(samples, handle))

    _, model_name, guide, prior = CELLS[CELL_NAMES.index(cell)]
    row = {
        "cell": cell,
        "model": model_name,
        "guide": guide,
        "prior": prior,
        "iw_bpd": test_metrics["iw_bpd"],
        "elbo_bpd": test_metrics["elbo_bpd"],
        "x_density": test_metrics.get("x_density"),
        "sr_psnr": test_metrics.get("sr_psnr"),
        "bicubic_psnr": test_metrics.get("bicubic_psnr"),
        "sr_ssim": test_metrics.get("sr_ssim"),
        "bicubic_ssim": test_metrics.get("bicubic_ssim"),
        # What the latents carry (pyro_srvae.metrics.latents): z is the VAE's only latent, the srVAE's detail one.
        **{key: test_metrics.get(key) for key in LATENT_KEYS},
        "fd": fd,
        "inception_fid": inception_fid,
        "mixture_effective_components": (result.metrics.get("mixture") or {}).get("effective_components"),
        "epochs": len(result.metrics["epochs"]),
        "steps": result.metrics["steps"][-1][0] if result.metrics["steps"] else 0,
        "seconds": round(time.time() - start, 1),
        "iw_samples": test_metrics["iw_samples"],
        "num_test_images": test_metrics["num_images"],
        "likelihood": settings.likelihood,
        "arch": settings.arch,
        "hidden": budget.hidden,
        "seed": settings.seed,
        "device": str(device),
    }
    atomic_write_text(cell_dir / ROW_FILE, json.dumps(row, indent=2) + "\n")
    cell_log(f"done: IW {row['iw_bpd']:.4f} bpd, fd {fd:.3f}, {row['seconds']:.0f} s")
    return row


def _check_settings_file(out_dir: Path, settings: ComparisonSettings):
    """Write ``comparison.json``, or refuse a directory that holds another comparison."""
    path = out_dir / SETTINGS_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path} is unreadable ({error}); remove it or choose another --out") from None
        if saved.get("identity") != settings.identity():
            changed = sorted(
                key for key in set(saved.get("identity", {})) | set(settings.identity())
                if saved.get("identity", {}).get(key) != settings.identity().get(key)
            )  # fmt: skip
            raise ConfigError(
                f"{out_dir} holds a comparison with other settings ({', '.join(changed)} differ); "
                f"choose another --out or remove it"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"identity": settings.identity(), "settings": settings.to_dict()}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _read_row(out_dir: Path, cell: str):
    path = out_dir / "cells" / cell / ROW_FILE
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a row that cannot be read is recomputed (rows are written atomically)
    return row if all(key in row for key in ROW_KEYS) else None


def _init_worker(threads):
    torch.set_num_threads(threads)


def run_comparison(
    settings: ComparisonSettings,
    out_dir,
    *,
    cells: Optional[Sequence[str]] = None,
    jobs: int = 1,
    device="auto",
    inception_weights=None,
    progress=True,
    log: Callable[[str], None] = print,
) -> List[dict]:
    """Run the grid (or ``cells`` of it) into ``out_dir``; write results.json and results.md.

    ``jobs > 1`` trains that many cells at once in worker processes, each with
    ``torch.get_num_threads() // jobs`` threads (CPU only: on these small networks two
    single-threaded processes outrun one process with two threads). Cells already done
    in ``out_dir`` are skipped. The optional Inception FID is computed where torch-fidelity
    and local Inception weights (``inception_weights``, ``$PYRO_SRVAE_INCEPTION_WEIGHTS`` or
    torch.hub's cache) are found, and skipped with one logged line otherwise -- never
    downloaded. Returns the rows of every finished cell, in grid order.
    """
    out_dir = Path(out_dir)
    cells = list(CELL_NAMES if cells is None else cells)
    for cell in cells:
        if cell not in CELL_NAMES:
            raise ConfigError(f"unknown cell {cell!r}; expected one of {', '.join(CELL_NAMES)}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    resolved = resolve_device(device)
    if jobs > 1 and resolved.type != "cpu":
        raise ConfigError("--jobs > 1 shares a CPU between cells; on a GPU run the cells one at a time (--jobs 1)")
    for cell in cells:
        cell_config(settings, cell, out_dir, device)  # every cell's configuration is valid before anything runs
    _check_settings_file(out_dir, settings)
    # Trained once here, before any worker asks for it from the cache.
    fd_classifier(settings, out_dir, resolved, log)

    todo = [cell for cell in cells if _read_row(out_dir, cell) is None]
    for cell in cells:
        if cell not in todo:
            log(f"[{cell}] already done, skipped ({out_dir / 'cells' / cell / ROW_FILE})")
    reason = frechet.inception_fid_unavailable_reason(inception_weights)
    if reason is not None:
        log(reason)
    kwargs = dict(device=device, inception=reason is None, inception_weights=inception_weights)
    if jobs == 1 or len(todo) <= 1:
        for cell in todo:
            run_cell(settings, cell, out_dir, progress=progress, log=log, **kwargs)
    else:
        threads = max(1, torch.get_num_threads() // jobs)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = {pool.submit(run_cell, settings, cell, out_dir, log=print, **kwargs): cell for cell in todo}
            for future in concurrent.futures.as_completed(futures):
                future.result()  # re-raises a cell's error here

    rows = [row for row in (_read_row(out_dir, cell) for cell in CELL_NAMES) if row is not None]
    atomic_write_text(out_dir / "results.json", json.dumps(rows, indent=2) + "\n")
    figure = _draw_samples(out_dir, rows)
    breakdown = bits_breakdown(settings, out_dir, rows, device=resolved)
    atomic_write_text(out_dir / "breakdown.json", json.dumps(breakdown, indent=2) + "\n")
    floor = fd_floor(settings, out_dir, resolved, log)
    atomic_write_text(out_dir / "results.md", results_markdown(rows, settings, figure, breakdown, floor))
    return rows


def fd_floor(settings: ComparisonSettings, out_dir, device="cpu", log=None) -> float:
    """``fd`` of *real* images: training images against the test images, what a perfect sampler scores.

    As many training images as ``fd`` generates (the first ones of the training split), through
    the same classifier, dequantized with the same seed. Cached in ``OUT/fd-floor.json``.
    """
    path = Path(out_dir) / FD_FLOOR_FILE
    if path.exists():
        return json.loads(path.read_text())["fd_floor"]
    test_images = comparison_test_images(settings)
    count = settings.budget.fd_samples or len(test_images)
    train_images = load_dataset(settings.dataset, "train", settings.data_dir).images[:count]
    classifier = fd_classifier(settings, out_dir, device, log)
    floor = frechet.compute_fd(train_images, test_images, classifier, num_samples=len(train_images), seed=settings.seed)
    atomic_write_text(path, json.dumps({"fd_floor": floor, "train_images": len(train_images)}, indent=2) + "\n")
    return floor


def bits_breakdown(settings: ComparisonSettings, out_dir, rows, device="cpu", batch_size=500) -> Dict[str, dict]:
    """Where each model's bits go: the ELBO split into its terms, in bits per dimension of x.

    For every finished cell, :func:`pyro_srvae.metrics.likelihood.elbo_terms` (one draw per image,
    seeded) over the test images gives, per site, ``data(NAME) = -log p(NAME | parents)``
    for the observed ``x`` and ``y`` and ``KL(NAME) = log q(NAME|.) - log p(NAME|.)`` for the
    latents ``u`` and ``z``, each divided by ``D ln 2`` (``D`` = dimensions of x). They sum
    to ``ELBO bpd - 8`` (:func:`pyro_srvae.metrics.likelihood.bits_per_dim`). This is what tells a
    VAE's bits/dim from an srVAE's: the srVAE's include the density of y (``data(y)``).
    """
    test_images = comparison_test_images(settings)
    num_dims = test_images[0].numel()
    result = {}
    for row in rows:
        checkpoint = Path(out_dir) / "cells" / row["cell"] / "checkpoint.pt"
        if not checkpoint.exists():
            continue
        pyro.clear_param_store()
        model = load_model(checkpoint, device=device, require_super_resolution=False)
        sums: Dict[str, float] = {}
        generator = torch.Generator().manual_seed(settings.seed)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(settings.seed)
            for start in range(0, len(test_images), batch_size):
                x = dequantize(test_images[start : start + batch_size], generator=generator).to(model.device)
                for name, value in elbo_terms(model.model, model.guide, x).items():
                    sums[name] = sums.get(name, 0.0) + value.double().sum().item()
        nats = {name: total / len(test_images) for name, total in sums.items()}
        to_bits = 1.0 / (num_dims * math.log(2.0))
        parts = {}
        for name, value in nats.items():
            site = name[name.index("(") + 1 : -1]
            if name.startswith("-log q("):
                continue
            if f"-log q({site})" in nats:
                parts[f"KL({site})"] = -(value + nats[f"-log q({site})"]) * to_bits
            else:
                parts[f"data({site})"] = -value * to_bits
        parts["elbo_bpd"] = sum(parts.values()) + 8.0
        result[row["cell"]] = parts
    pyro.clear_param_store()
    return result


def _draw_samples(out_dir: Path, rows):
    images, titles = [], []
    for row in rows:
        path = out_dir / "cells" / row["cell"] / SAMPLES_FILE
        try:
            images.append(torch.load(path, weights_only=True))
        except (OSError, RuntimeError, ValueError):
            continue
        titles.append(f"{_label(row)}, {row['prior']} prior")
    if not images:
        return None
    return plots.plot_model_samples(images, titles, out_dir / "samples.png")


def _label(row):
    return "VAE" if row["model"] == "vae" else f"srVAE ({row['guide']})"


def _number(value, digits):
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def check_targets(rows) -> List[dict]:
    """The issue's three targets, per prior: (srVAE vs VAE, same likelihood and prior).

    * IW bits/dim of the srVAE within 0.1 of the VAE's;
    * ``fd`` of the srVAE below the VAE's;
    * SR PSNR at least 2 dB over bicubic.
    """
    checks = []
    for prior in ("gaussian", "mog"):
        vae = next((r for r in rows if r["model"] == "vae" and r["prior"] == prior), None)
        for row in rows:
            if row["model"] != "srvae" or row["prior"] != prior:
                continue
            who = f"{_label(row)}, {prior} prior"
            if vae is not None:
                gap = row["iw_bpd"] - vae["iw_bpd"]
                density = row.get("x_density") or "joint"
                # The spec's joint is not a density of x: it cannot meet a likelihood target.
                comparable = density in ("exact", "bound")
                checks.append(dict(model=who, target="IW bpd within 0.1 of the VAE's", met=comparable and abs(gap) <= 0.1,
                                   detail=f"{row['iw_bpd']:.3f} ({density}) vs {vae['iw_bpd']:.3f} ({gap:+.3f})"))
                checks.append(dict(model=who, target="fd below the VAE's", met=row["fd"] < vae["fd"],
                                   detail=f"{row['fd']:.3f} vs {vae['fd']:.3f}"))
            if row.get("sr_psnr") is not None:
                gain = row["sr_psnr"] - row["bicubic_psnr"]
                checks.append(dict(model=who, target="SR PSNR >= bicubic + 2 dB", met=gain >= 2.0,
                                   detail=f"{row['sr_psnr']:.2f} vs {row['bicubic_psnr']:.2f} dB ({gain:+.2f})"))
    return checks


def results_markdown(rows, settings: ComparisonSettings, figure=None, breakdown=None, floor=None) -> str:
    """``results.md``: settings, the table, the targets, the bits breakdown and the figure."""
    budget = settings.budget
    test = "all" if budget.eval_limit is None else f"the first {budget.eval_limit}"
    train_images = "all" if budget.train_limit is None else f"the first {budget.train_limit}"
    lines = [
        "# VAE vs srVAE",
        "",
        f"Dataset `{settings.dataset}` ({train_images} training images, {test} test images); "
        f"likelihood `{settings.likelihood}`, arch `{settings.arch}` (width {budget.hidden}); "
        f"{budget.epochs} epochs at batch {budget.batch_size}; seed {settings.seed} for every cell.",
        f"IW bits/dim with K = {budget.iw_samples} importance samples per test image; the ELBO from the same "
        f"samples. The `x density` column says what each bits/dim is: `exact` (a normalized density of x), "
        f"`bound` (a lower bound on one: y on the 8-bit grid) or `joint` (the spec's p(x, y = f(x)): not a "
        f"density of x, not comparable with a VAE's).",
        f"Machine: {platform.machine()} {platform.processor() or ''}".rstrip()
        + f", {os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
        "| model | prior | IW bpd | ELBO bpd | x density | SR PSNR (dB) | bicubic PSNR (dB) | SR SSIM | fd | epochs | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {_label(row)} | {row['prior']} | {_number(row['iw_bpd'], 4)} | {_number(row['elbo_bpd'], 4)} | "
            f"{row.get('x_density') or '-'} | "
            f"{_number(row['sr_psnr'], 2)} | {_number(row['bicubic_psnr'], 2)} | {_number(row['sr_ssim'], 4)} | "
            f"{_number(row['fd'], 3)} | {row['epochs']} | {row['seconds']:.0f} |"
        )
    if floor is not None:
        lines += ["", f"fd floor (training images against the test images, what a perfect sampler scores): "
                  f"{_number(floor, 3)}."]  # fmt: skip
    if any(row.get("inception_fid") is not None for row in rows):
        lines += ["", "Inception FID: " + ", ".join(
            f"{_label(r)} ({r['prior']}) {_number(r.get('inception_fid'), 2)}" for r in rows)]  # fmt: skip
    carried = [row for row in rows if row.get("kl_z_bits") is not None]
    if carried:
        lines += [
            "", "## What the latents carry", "",
            "KL(q || p) in bits per test image; active units of z (Cov > 0.01); for the srVAE, the latents' "
            "share of the SR predictive's variance and the best of the SR draws' decoder means against the mean "
            "(docs/results.md, \"What z carries\").",
            "", "| model | prior | KL(z) bits | KL(u) bits | active z | latent share | best of S (dB over the mean) |",
            "|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for row in carried:
            active = f"{row['active_z']}/{row['z_dim']}" if row.get("active_z") is not None else "-"
            gain = "—" if row.get("sr_best_of_gain") is None else f"{row['sr_best_of_gain']:+.2f}"
            lines.append(f"| {_label(row)} | {row['prior']} | {_number(row['kl_z_bits'], 1)} | "
                         f"{_number(row.get('kl_u_bits'), 1)} | {active} | {_number(row.get('sr_latent_share'), 3)} | {gain} |")
    checks = check_targets(rows)
    if checks:
        lines += ["", "## Targets", "", "| model | target | met | numbers |", "|---|---|---|---|"]
        for check in checks:
            lines.append(f"| {check['model']} | {check['target']} | {'yes' if check['met'] else '**no**'} | {check['detail']} |")
    if breakdown:
        columns = ["data(y)", "data(x)", "KL(u)", "KL(z)"]
        lines += [
            "", "## Where the bits go", "",
            "The ELBO per dimension of x, term by term (one draw per test image): data terms "
            "-log p(y|u) and -log p(x|...), and the KL terms of u and z. They add up to ELBO bpd - 8.",
            "", "| model | prior | " + " | ".join(columns) + " | ELBO bpd |", "|---|---|" + "---|" * (len(columns) + 1),
        ]  # fmt: skip
        for row in rows:
            parts = breakdown.get(row["cell"])
            if parts is None:
                continue
            cells = " | ".join(_number(parts.get(column), 4) for column in columns)
            lines.append(f"| {_label(row)} | {row['prior']} | {cells} | {_number(parts['elbo_bpd'], 4)} |")
    if figure is not None:
        lines += ["", "## Samples", "", f"![samples of each model, side by side]({Path(figure).name})"]
    missing = [name for name in CELL_NAMES if name not in {row["cell"] for row in rows}]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"
