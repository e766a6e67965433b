"""Data-parallel training under torchrun (gloo on CPU) and the faults around it.

Every multi-process test here runs on two CPU processes over loopback. Ranks are started
either by torchrun itself or as two plain processes carrying torchrun's environment
variables (``start_ranks``), which lets a test signal or kill one chosen rank.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing

import pyro
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_srvae import SRVAE, TrainConfig, evaluate_model, make_elbo, train
from pyro_srvae.training import distributed
from pyro_srvae.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyro_srvae.utils.io import atomic_write_bytes, remove_stale_temporaries
from pyro_srvae.utils.seeds import derive_seed
from pyro_srvae.training.distributed import DistributedContext, ProcessGroupLost, state_digest
from pyro_srvae.training.objective import DataParallelElbo
from conftest import tiny_images

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_srvae.py"
# Tiny and fast: 4 global batches of 2 x 32 images an epoch, narrow networks, full guide
# and KL warm-up so that the per-step scale and both guide networks are exercised.
RUN_FLAGS = [
    "--train-limit", "256", "--eval-limit", "16", "--batch-size", "32", "--hidden", "4",
    "--eval-samples", "4", "--sr-samples", "4", "--guide", "full", "--kl-warmup", "1.5",
    "--device", "cpu", "--no-figures", "--quiet",
]  # fmt: skip
SINGLE_FLAGS = [
    "--train-limit", "128", "--eval-limit", "16", "--batch-size", "32", "--hidden", "4",
    "--eval-samples", "4", "--sr-samples", "4", "--quiet",
]  # fmt: skip
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra):
    """The test environment without torchrun variables, one thread per process, and
    faulthandler on so that a crashed worker says where it was."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and k != distributed.TIMEOUT_ENV}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **extra)
    return env


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(*args, nproc=2, timeout=120):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*command, str(SCRIPT), *args], capture_output=True, text=True, env=clean_env(), timeout=timeout
    )


def start_ranks(*args, world_size=2, **extra_env):
    """``world_size`` processes of the training script with torchrun's variables, no torchrun."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = clean_env(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), **extra_env,
        )  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    return processes


def wait_for(predicate, processes, timeout=60):
    """Poll until ``predicate()`` holds; fail early if a process exits first."""
    deadline = time.time() + timeout
    while not predicate():
        exited = [p.returncode for p in processes if p.poll() is not None]
        assert not exited, f"a process exited (codes {exited}) before the condition held"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def stop_all(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


# -- torchrun: a whole run ------------------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """One uninterrupted 2-process run (3 epochs of 4 steps), shared by several tests."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    result = run_torchrun("--epochs", "3", "--checkpoint-every", "3", "--out", str(out), *RUN_FLAGS)
    assert result.returncode == 0, result.stderr
    return out, result


def test_torchrun_two_gloo_processes_train_in_sync(torchrun_run):
    out, result = torchrun_run
    assert "data-parallel on 2 processes (gloo, gradients by ddp)" in result.stdout
    assert result.stdout.count("test IW (K=4)") == 1  # rank 0 alone logs the summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["distributed"]["backend"] == "gloo" and metrics["distributed"]["global_batch_size"] == 64
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3] and metrics["epochs"][-1]["step"] == 12
    # Rank 0 wrote one checkpoint, atomically.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json"]
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["step"] == 12 and checkpoint["world_size"] == 2
    # Identical weights on both ranks, and they are the checkpoint's.
    digests = metrics["distributed"]["state_digests"]
    assert metrics["distributed"]["ranks_identical"] and len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == state_digest(checkpoint["model_state"])
    # Every rank's RNG state is saved, and the ranks drew different noise.
    first, second = checkpoint["rng_by_rank"]
    assert not torch.equal(first["torch"], second["torch"])
    assert torch.equal(checkpoint["rng"]["torch"], first["torch"])


def test_resumed_data_parallel_run_matches_the_uninterrupted_one(torchrun_run, tmp_path):
    whole, _ = torchrun_run
    out = tmp_path / "split"
    first = run_torchrun("--epochs", "3", "--max-steps", "5", "--out", str(out), *RUN_FLAGS)
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(out / "checkpoint.pt")["batch_in_epoch"] == 1  # stopped mid-epoch
    resumed = run_torchrun("--resume", str(out / "checkpoint.pt"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((whole / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["state_digests"] == expected["distributed"]["state_digests"]
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3]
    for a, b in zip(expected["epochs"], metrics["epochs"]):
        assert a["train_objective_bpd"] == pytest.approx(b["train_objective_bpd"], abs=1e-5)
        assert a["test_elbo_bpd"] == pytest.approx(b["test_elbo_bpd"], abs=1e-6)
    assert metrics["test"]["iw_bpd"] == pytest.approx(expected["test"]["iw_bpd"], abs=1e-6)


# -- the gradient and the evaluation of two ranks against one process --------------------


class FixedLatentNoise(Messenger):
    """Draw each unobserved guide site as ``loc + scale * eps[site]``: a reparameterised
    sample whose noise the test chooses, so that a rank's shard can get exactly the noise
    one process uses for the same images."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["value"] is None and not msg["is_observed"] and msg["name"] in self.eps:
            base = msg["fn"]
            while hasattr(base, "base_dist"):
                base = base.base_dist
            msg["value"] = base.loc + base.scale * self.eps[msg["name"]]


GLOBAL_BATCH = 8
ELBOS = {"meanfield": "ddp", "graph": "all-reduce"}


def _fresh_model():
    pyro.clear_param_store()
    torch.manual_seed(0)
    return SRVAE((1, 8, 8), guide="full", hidden=4)


def _global_batch():
    """Fixed images and latent noise for the whole global batch."""
    x = tiny_images(GLOBAL_BATCH)
    guide_trace = poutine.trace(_fresh_model().guide).get_trace(x)
    generator = torch.Generator().manual_seed(1)
    eps = {
        name: torch.randn(site["value"].shape, generator=generator)
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    assert set(eps) == {"u", "z"}
    return x, eps


def _gradients(elbo_name, context):
    """This rank's loss and the synchronised gradients, on its shard of the global batch."""
    x, eps = _global_batch()
    shard = slice(context.rank * GLOBAL_BATCH // context.world_size, (context.rank + 1) * GLOBAL_BATCH // context.world_size)
    model = _fresh_model()
    objective = DataParallelElbo(model, make_elbo(elbo_name), context)
    with FixedLatentNoise({name: noise[shard] for name, noise in eps.items()}):
        loss = objective.loss_and_backward(x[shard], kl_scale=0.5)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"loss": loss.item(), "sync": objective.sync, "grads": grads}


def _evaluation(context):
    model = _fresh_model()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    return evaluate_model(
        model, images, elbo_samples=2, iw_samples=3, sr_samples=4, batch_size=3, seed=7,
        rank=context.rank, world_size=context.world_size,
    )  # fmt: skip


def _data_parallel_worker(rank, world_size, port, out_dir):
    """One rank of the in-test process group (started by torch.multiprocessing)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    threads_before = _thread_count()
    context = distributed.connect(torch.device("cpu"))
    try:
        assert context.enabled and context.backend == "gloo" and context.rank == rank
        results = {name: _gradients(name, context) for name in ELBOS}
        results["evaluation"] = _evaluation(context)
    finally:
        context.close()
    results["threads"] = (threads_before, _thread_count())
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _thread_count():
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    processes = torch.multiprocessing.start_processes(
        _data_parallel_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + 120
    while not processes.join(timeout=1):
        if time.time() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("elbo_name", sorted(ELBOS))
def test_data_parallel_gradient_equals_the_single_process_gradient(two_rank_results, elbo_name):
    single = _gradients(elbo_name, DistributedContext())
    ranks = [results[elbo_name] for results in two_rank_results]
    assert single["sync"] is None and all(r["sync"] == ELBOS[elbo_name] for r in ranks)
    # The ranks' losses are the two halves of the global batch's loss ...
    assert sum(r["loss"] for r in ranks) == pytest.approx(single["loss"], rel=1e-5)
    # ... and each rank holds the gradient of the whole global batch.
    for rank in ranks:
        for name, expected in single["grads"].items():
            assert torch.allclose(rank["grads"][name], expected, rtol=1e-5, atol=1e-6 * expected.abs().max()), name
    nonzero = [name for name, g in single["grads"].items() if g.abs().max() > 0]
    assert len(nonzero) == len(single["grads"])  # every parameter takes part
    for name in single["grads"]:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name  # bitwise equal across ranks


def test_sharded_evaluation_equals_the_single_process_evaluation(two_rank_results):
    single = _evaluation(DistributedContext())
    for results in two_rank_results:
        sharded = results["evaluation"]
        assert set(sharded) == set(single)
        _assert_same_numbers(sharded, single)


def _assert_same_numbers(got, expected, path="test"):
    """Floats to rounding, nested dicts (sr_coverage) key by key, strings and None exactly."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            _assert_same_numbers(got[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (str, type(None))):
        assert got == expected, path
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), path


def test_closing_the_context_stops_the_gloo_threads(two_rank_results):
    """After DDP has run, close() must really free the process group: gloo worker threads
    left running at interpreter exit can abort the process (see distributed.connect)."""
    for results in two_rank_results:
        before, after = results["threads"]
        if before is None:
            pytest.skip("no /proc/self/task to count threads")
        assert after <= before + 1, results["threads"]  # gloo runs three: two workers and a loop


# -- faults: SIGKILL, SIGTERM, a dead or hung rank --------------------------------------------


def test_sigkill_after_the_first_checkpoint_resumes_and_finishes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(SCRIPT), "--epochs", "3", "--checkpoint-every", "2", "--out", str(out), *SINGLE_FLAGS]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for((out / "checkpoint.pt").exists, [process])
        process.send_signal(signal.SIGKILL)
    finally:
        stop_all([process])
    assert process.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 0 < killed_at < 12
    resumed = subprocess.run(
        [sys.executable, str(SCRIPT), "--resume", str(out / "checkpoint.pt"), "--quiet"],
        capture_output=True, text=True, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3] and metrics["epochs"][-1]["step"] == 12
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 12
    assert not list(out.glob(".*.tmp"))  # the resumed run cleared what the killed one left


def test_checkpoint_survives_sigkill_at_random_moments(tmp_path):
    """Kill a run that checkpoints every step at random moments, resume it, kill it again:
    the file under the final name always loads, and the run still finishes."""
    out = tmp_path / "run"
    checkpoint = out / "checkpoint.pt"
    chooser = random.Random(0)
    fresh = [sys.executable, str(SCRIPT), "--epochs", "4", "--checkpoint-every", "1", "--out", str(out), *SINGLE_FLAGS]
    steps = []
    for attempt in range(3):
        args = fresh if not checkpoint.exists() else [sys.executable, str(SCRIPT), "--resume", str(checkpoint), "--quiet"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=clean_env())
        try:
            before = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            # Wait for this process's first write, then kill it a random moment later.
            wait_for(lambda: checkpoint.exists() and checkpoint.stat().st_mtime_ns != before, [process])
            time.sleep(chooser.uniform(0.0, 0.5))
            process.send_signal(signal.SIGKILL)
        finally:
            stop_all([process])
        steps.append(load_checkpoint(checkpoint)["step"])  # never partial, never corrupt
        if steps[-1] == 16:
            break
    assert steps == sorted(steps) and steps[0] > 0
    final = subprocess.run(
        [sys.executable, str(SCRIPT), "--resume", str(checkpoint), "--quiet"],
        capture_output=True, text=True, env=clean_env(), timeout=120,
    )  # fmt: skip
    assert final.returncode == 0, final.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2, 3, 4]
    assert not list(out.glob(".*.tmp"))


def test_sigterm_on_one_rank_stops_both_at_the_same_step_and_resumes(tmp_path):
    out = tmp_path / "run"
    ranks = start_ranks("--epochs", "200", "--checkpoint-every", "2", "--out", str(out), *RUN_FLAGS)
    try:
        wait_for((out / "checkpoint.pt").exists, ranks)
        ranks[1].send_signal(signal.SIGTERM)  # rank 0 hears nothing: the ranks must agree
        outputs = [process.communicate(timeout=60) for process in ranks]
    finally:
        stop_all(ranks)
    assert [process.returncode for process in ranks] == [143, 143], [err for _, err in outputs]
    assert all("interrupted by signal 15" in err and "Traceback" not in err for _, err in outputs)
    stopped = [int(err.split(" at step ")[1].split(";")[0]) for _, err in outputs]
    assert stopped[0] == stopped[1]
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["step"] == stopped[0] and checkpoint["world_size"] == 2 and len(checkpoint["rng_by_rank"]) == 2
    resumed = run_torchrun("--resume", str(out / "checkpoint.pt"), "--epochs", str(checkpoint["epoch"] + 1), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed"]["ranks_identical"]
    assert [r["epoch"] for r in metrics["epochs"]] == list(range(1, checkpoint["epoch"] + 2))


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_makes_the_other_exit_with_a_clear_message(tmp_path, fault):
    """Rank 1 is killed (its sockets close) or stopped (it never answers): rank 0 must not
    hang but exit non-zero with one line, at once or after the collective timeout."""
    out = tmp_path / "run"
    ranks = start_ranks(
        "--epochs", "200", "--checkpoint-every", "2", "--out", str(out), *RUN_FLAGS,
        **{distributed.TIMEOUT_ENV: "3"},
    )  # fmt: skip
    try:
        wait_for((out / "checkpoint.pt").exists, ranks)
        ranks[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        lost_at = time.time()
        _, stderr = ranks[0].communicate(timeout=60)
        waited = time.time() - lost_at
    finally:
        stop_all(ranks)
    assert ranks[0].returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: rank 0 of 2 lost contact with the process group"), lines[0]
    assert "did not answer for 3 s" in lines[0] and f"--resume {out / 'checkpoint.pt'}" in lines[0]
    assert waited < (10 if fault == "killed" else 30)
    load_checkpoint(out / "checkpoint.pt")  # the last checkpoint is intact


# -- single-process pieces ---------------------------------------------------------------


def test_without_torchrun_variables_there_is_no_process_group(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    context = distributed.connect(torch.device("cpu"))
    assert not context.enabled and context.is_main and context.backend is None
    assert not torch.distributed.is_initialized()
    tensor = torch.ones(3)
    assert context.all_reduce_sum(tensor) is tensor and torch.equal(tensor, torch.ones(3))
    assert context.all_gather_object({"a": 1}) == [{"a": 1}] and context.broadcast_object(5) == 5
    module = torch.nn.Linear(2, 2)
    assert context.data_parallel(module) is module
    context.barrier()
    context.close()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not distributed.connect(torch.device("cpu")).enabled  # torchrun with one process
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "but not LOCAL_RANK"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "inconsistent"),
    ],
)
def test_unusable_launch_variables_are_one_line(environ, message):
    with pytest.raises(ValueError, match=message):
        distributed.launch_environment(environ)
    assert distributed.launch_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    assert distributed.launch_environment({}) is None


def test_train_refuses_partial_launch_variables_as_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    from pyro_srvae import ConfigError

    with pytest.raises(ConfigError, match="start data-parallel runs with torchrun"):
        train(TrainConfig(max_steps=1, train_limit=64, batch_size=32, hidden=4), out=str(tmp_path), progress=False)


def test_collective_timeout_comes_from_the_environment():
    assert distributed.timeout_from_env({}).total_seconds() == distributed.DEFAULT_TIMEOUT_SECONDS
    assert distributed.timeout_from_env({distributed.TIMEOUT_ENV: "2.5"}).total_seconds() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
            distributed.timeout_from_env({distributed.TIMEOUT_ENV: bad})


def test_lost_contact_is_one_line_and_a_system_exit():
    context = DistributedContext(rank=1, world_size=2)
    context.resume_hint = "Resume with --resume x/checkpoint.pt"
    error = RuntimeError(
        "[/w/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:5: Connection reset by peer. "
        "This is typically caused by a remote worker hanging.\nmore"
    )
    assert distributed.is_communication_failure(error)
    assert not distributed.is_communication_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(ProcessGroupLost) as info:
        with context.lost_contact_on_failure("a test"):
            raise error
    assert isinstance(info.value, SystemExit)
    assert info.value.code == (
        "error: rank 1 of 2 lost contact with the process group during a test (a peer process died, or did "
        f"not answer for the timeout; {distributed.TIMEOUT_ENV} sets the wait): Read error [127.0.0.1]:5: "
        "Connection reset by peer. Resume with --resume x/checkpoint.pt"
    )
    with pytest.raises(RuntimeError, match="shapes"):  # other errors pass through
        with context.lost_contact_on_failure():
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def test_state_digest_tells_equal_weights_from_different_ones():
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.float64)}
    same = {"b": torch.zeros(2, dtype=torch.float64), "w": torch.arange(6.0).reshape(2, 3)}
    assert state_digest(state) == state_digest(same)  # order of the keys does not matter
    nudged = dict(state, w=state["w"] + torch.tensor(1e-7))
    assert state_digest(nudged) != state_digest(state)
    assert state_digest(dict(state, w=state["w"].reshape(3, 2))) != state_digest(state)


def test_rank_seeds_differ_and_are_stable():
    seeds = {derive_seed(0, "rank", rank) for rank in range(8)} | {derive_seed(1, "rank", rank) for rank in range(8)}
    assert len(seeds) == 16 and all(0 <= s < 2**32 for s in seeds)
    assert derive_seed(0, "rank", 1) == derive_seed(0, "rank", 1)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")

    def write_half_then_fail(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, write_half_then_fail)
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"left by a killed writer")
    other = tmp_path / ".notes.txt.abc.tmp"
    other.write_bytes(b"someone else's")
    assert remove_stale_temporaries(tmp_path, ["checkpoint.pt"]) == [stale]
    assert not stale.exists() and other.exists()


def test_changing_the_process_count_mid_epoch_is_refused(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    first = train(TrainConfig(epochs=2, max_steps=1, train_limit=128, batch_size=32, hidden=4, eval_limit=8,
                              eval_samples=2, sr_samples=2, figures=False), out=str(tmp_path), **quiet)  # fmt: skip
    payload = load_checkpoint(first.checkpoint)
    assert payload["world_size"] == 1 and payload["batch_in_epoch"] == 1 and "rng_by_rank" not in payload
    save_checkpoint(first.checkpoint, dict(payload, world_size=2))
    with pytest.raises(CheckpointError, match="resume it with 2 process"):
        train(resume=first.checkpoint, **quiet)
