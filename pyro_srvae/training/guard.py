"""The update guard: skip an update whose gradient is non-finite or far above its recent median
(docs/training-faults.md).
"""

import math
from pathlib import Path

import torch

#: The update guard's memory (docs/training-faults.md): the gradient norms of the last 64 steps taken,
#: whose median sets the threshold once 8 of them are in. A fresh run's first norms fall (2.4e5 to 6e4
#: in 10 steps on the default recipe), so an early median errs high, which skips less, never more.
GUARD_WINDOW = 64

GUARD_WARMUP = 8

#: After this many skips in a row, a finite step above the threshold is taken, clipped to the threshold:
#: a skipped step moves nothing, so large gradients that belong to the parameters rather than to a batch
#: are left only by steps taken (docs/training-faults.md, "Skips that froze a transient").
GUARD_RESCUE_AFTER = 3


class UpdateGuard:
    """Skips an optimizer update whose global gradient norm is not finite or far above its recent history.

    VDVAE (Child 2021, ``train.py``'s ``skip_threshold``) skips above a fixed norm, to be picked
    per dataset and model; here the threshold adapts: ``factor`` times the median norm of the last
    ``window`` updates taken. A median ignores the rare large norms a mean would follow, and a
    skipped norm never enters the window, so a burst of spikes cannot raise the bar. Until
    ``warmup`` norms are in, only non-finite gradients are skipped. After ``rescue_after`` skips in
    a row, a finite step above the threshold is taken, scaled down to the threshold: a skipped step
    moves nothing, so large gradients that belong to the parameters, not to a batch, would
    otherwise be frozen in place (docs/training-faults.md).

    The decision stays on the device: :meth:`decide` returns a boolean tensor that masks the
    optimizer step (:func:`step_unless_skipped`); the counts reach the host only at the loop's
    host syncs (:meth:`counts`). The state is plain numbers in the checkpoint (:meth:`state_dict`),
    kept even with ``factor == 0`` (off), so that a run resumed without the guard keeps its counts.
    """

    def __init__(self, factor, max_consecutive, device="cpu", window=GUARD_WINDOW, warmup=GUARD_WARMUP, clip_factor=0.0,
                 rescue_after=GUARD_RESCUE_AFTER):
        self.factor, self.max_consecutive, self.window, self.warmup = factor, max_consecutive, window, warmup
        self.rescue_after = rescue_after
        self.clip_factor = clip_factor
        self.device = torch.device(device)
        self.load_state_dict({})

    @property
    def enabled(self):
        return self.factor > 0 or self.clip_factor > 0

    def decide(self, norm, step):
        """Whether to take step ``step``'s update, whose gradient norm is ``norm``: a device boolean, no host sync."""
        norm = norm.detach().float().reshape(1).to(self.device)
        median = torch.nanmedian(self.norms)  # NaN marks an empty place of the window
        trusted = (torch.isfinite(self.norms).sum() >= self.warmup) & (median > 0)
        threshold = torch.where(trusted & (self.factor > 0), self.factor * median, math.inf)
        finite = torch.isfinite(norm)
        within = norm <= threshold
        # After rescue_after skips in a row, the step is taken clipped to the threshold: a bad batch is skipped,
        # a bad state is left in bounded steps. Its raw norm enters the window, as a clipped one's does.
        rescued = finite & ~within & (self.consecutive >= self.rescue_after)
        taken = finite & (within | rescued)
        scale = torch.where(rescued, threshold / norm, 1.0)
        if self.clip_factor > 0:
            # A taken step above clip_factor x the median is scaled down to it (adaptive clipping, as AutoClip:
            # Seetharaman et al. 2020); its raw norm enters the window, so that a lasting change of scale moves the median.
            clip = torch.where(trusted, self.clip_factor * median, math.inf)
            clipped = taken & (norm > clip)
            scale = torch.minimum(scale, torch.where(clipped, clip / norm, 1.0))
            self.clipped = self.clipped + clipped
        self.clip_scale = scale.reshape(())
        self.rescued = self.rescued + rescued
        self.norms = torch.where(taken, torch.cat([self.norms[1:], norm]), self.norms)  # slides by a taken norm only
        self.skipped = self.skipped + ~taken
        self.nonfinite = self.nonfinite + ~finite
        self.consecutive = (self.consecutive + 1) * ~taken
        # Where the skips in a row first reached the limit: the loop stops at its next host sync.
        first = (self.consecutive >= self.max_consecutive) & (self.stuck[:1] == 0)
        where = torch.cat([torch.full_like(norm, step), norm, threshold.reshape(1)])
        self.stuck = torch.where(first, where, self.stuck)
        self.taken = taken.reshape(())
        return self.taken

    def counts(self):
        """The counts on the host (one sync): skipped (non-finite included), nonfinite, consecutive, the
        median norm of the window, and ``stuck`` = (step, norm, threshold) where the skips in a row reached
        the limit, or None."""
        median = torch.nanmedian(self.norms).reshape(1)
        values = torch.cat([self.skipped.double(), self.nonfinite.double(), self.consecutive.double(),
                            self.clipped.double(), self.rescued.double(), median.double(), self.stuck.double()]).tolist()  # fmt: skip
        skipped, nonfinite, consecutive, clipped, rescued, median, step, norm, threshold = values
        return {
            "skipped": int(skipped), "nonfinite": int(nonfinite), "consecutive": int(consecutive), "clipped": int(clipped),
            "rescued": int(rescued),
            "median": median if math.isfinite(median) else None,
            "stuck": (int(step), norm, threshold) if step else None,
        }  # fmt: skip

    def stop_if_stuck(self, counts, checkpoint_path):
        """Raise :class:`TrainingDiverged`, one line, once ``max_consecutive`` updates in a row were skipped."""
        if counts["stuck"] is None:
            return
        step, norm, threshold = counts["stuck"]
        bar = (f"threshold {threshold:.3g} = {self.factor:g} x the median norm of up to {self.window} last steps taken"
               if math.isfinite(threshold) else f"no threshold before {self.warmup} steps are taken")  # fmt: skip
        kept = (f"the last good checkpoint is {checkpoint_path}" if Path(checkpoint_path).exists()
                else "no checkpoint was written yet")  # fmt: skip
        raise TrainingDiverged(
            f"{self.max_consecutive} updates in a row skipped by step {step} (gradient norm {norm:.3g}, {bar}; "
            f"{counts['skipped']} skipped in all, {counts['nonfinite']} non-finite); stopped without saving, {kept} "
            f"(lower --lr, or raise --skip-factor or --max-consecutive-skips)"
        )

    def state_dict(self):
        """Plain numbers (a checkpoint loads with ``weights_only=True``): the window and the counts."""
        counts = self.counts()
        norms = [value for value in self.norms.tolist() if math.isfinite(value)]
        return {"norms": norms, **{key: counts[key] for key in ("skipped", "nonfinite", "consecutive", "clipped", "rescued")}}

    def load_state_dict(self, state):
        """The state :meth:`state_dict` gave; ``{}``: a fresh guard (an empty window, no skips)."""
        norms = list(state.get("norms", []))[-self.window :]
        self.norms = torch.full((self.window,), math.nan, device=self.device)
        if norms:  # newest last, as decide() slides them in
            self.norms[self.window - len(norms) :] = torch.tensor(norms, dtype=torch.float32, device=self.device)
        integer = dict(dtype=torch.int64, device=self.device)
        self.skipped = torch.tensor([state.get("skipped", 0)], **integer)
        self.nonfinite = torch.tensor([state.get("nonfinite", 0)], **integer)
        self.consecutive = torch.tensor([state.get("consecutive", 0)], **integer)
        self.clipped = torch.tensor([state.get("clipped", 0)], **integer)
        self.rescued = torch.tensor([state.get("rescued", 0)], **integer)
        self.clip_scale = torch.ones((), device=self.device)
        self.stuck = torch.zeros(3, device=self.device)
        self.taken = torch.ones((), dtype=torch.bool, device=self.device)


def update_guard_summary(guard):
    """What metrics.json records of the :class:`UpdateGuard`: the updates skipped (the non-finite ones
    included) and, of them, those whose gradient was not finite; the median gradient norm of the last
    steps taken (the scale its threshold multiplies; None before any step was taken)."""
    counts = guard.counts()
    return {
        "skipped_updates": counts["skipped"],
        "skipped_nonfinite_updates": counts["nonfinite"],
        "clipped_updates": counts["clipped"],
        "rescued_updates": counts["rescued"],
        "gradient_norm_median": counts["median"],
    }


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
