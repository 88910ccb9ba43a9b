"""Per-phase training monitor: log lines, TensorBoard scalars, a loss/usage plot, summaries.

The train loop hands `PhaseMonitor.record` the step's metrics as device values; they
are only fetched to the host (one `jax.device_get` for the whole interval) when a
log line is due or `sync` is called before a checkpoint, so dispatch stays asynchronous
between those steps. Steps count completed optimizer steps of the phase: 1..total_steps.

The loss of every step is also appended to WORKDIR/history/<phase>.jsonl, and the code
counts of every usage step to WORKDIR/history/<phase>.usage.jsonl. A phase that resumes
from the checkpoint at step S keeps the lines up to S, so its summary and plot cover the
whole phase, as if it had never stopped.

TensorBoard event files are written by `events.ScalarWriter`, which needs no TensorFlow.
"""
import io
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bridle_jax import files
from bridle_jax.train import events

# Metrics shown at the log step itself rather than averaged over the interval.
_POINT_METRICS = ("lr",)


def codebook_usage_stats(counts) -> tuple[np.ndarray, np.ndarray]:
  """Per-codebook fraction of codes used and perplexity of (S, K) assignment counts.

  Perplexity is exp(entropy) of the normalised counts: K for uniform use, 1 for a
  single code. A codebook without any assignment gets fraction 0 and perplexity 0.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2:
    raise ValueError(f"counts must be (codebooks, codes), got shape {counts.shape}")
  totals = counts.sum(-1, keepdims=True)
  probs = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
  plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
  perplexity = np.where(totals[:, 0] > 0, np.exp(-plogp.sum(-1)), 0.0)
  return (counts > 0).mean(-1), perplexity


def write_summary(workdir: str, summary: dict) -> str:
  """Writes `summary` to WORKDIR/summary.json atomically (process 0 only); returns the path.

  numpy and jax scalars/arrays become Python numbers/lists; non-finite floats
  become null so the file is strict JSON.
  """
  path = os.path.join(workdir, "summary.json")
  if jax.process_index() != 0:
    return path
  os.makedirs(workdir, exist_ok=True)
  text = json.dumps(_to_json(summary), indent=2, allow_nan=False) + "\n"
  files.write_atomic(path, text.encode("utf-8"))
  return path


class PhaseMonitor:
  """Logs, TensorBoard scalars, loss history and codebook usage of one training phase."""

  def __init__(self, workdir: str, phase_id: str, total_steps: int, global_batch_size: int,
               log_every: int, usage_every: int, is_writer: bool = True, start_step: int = 0):
    """start_step: the step the phase (re)starts at, 0 or that of the restored checkpoint."""
    for name, value in (("total_steps", total_steps), ("global_batch_size", global_batch_size),
                        ("log_every", log_every), ("usage_every", usage_every)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    self.workdir = workdir
    self.phase_id = phase_id
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.log_every = log_every
    self.usage_every = usage_every
    self.is_writer = is_writer
    # This run hides the events an earlier run of the phase wrote after the checkpoint it
    # resumes from (after none: all of them, for a run that stopped before its first).
    self._writer = (events.ScalarWriter(os.path.join(workdir, "tensorboard", phase_id),
                                        purge_step=start_step + 1)
                    if is_writer else None)
    self._start_time = time.perf_counter()
    self._pending = []  # (step, {name: device or host value}) not yet logged.
    self._fetched = 0  # How many of the pending entries hold host values.
    self._history_path = os.path.join(workdir, "history", f"{phase_id}.jsonl")
    self._usage_path = os.path.join(workdir, "history", f"{phase_id}.usage.jsonl")
    restored_losses = _restore_records(self._history_path, start_step) if is_writer else []
    restored_usage = _restore_records(self._usage_path, start_step) if is_writer else []
    # (step, loss) host values of every fetched step, earlier runs of the phase included.
    self.loss_history = [(r["step"], math.nan if r["loss"] is None else r["loss"])
                         for r in restored_losses]
    self._steps_recorded = 0
    self._first_step = start_step  # Where this run began.
    self._last_step = start_step
    self._interval_start_step = start_step  # The step before the current log interval.
    self._last_log_time = self._start_time
    self._first_log = None  # (steps recorded, time) at the first log line.
    self._usage_total = None  # (S, K) counts summed over the phase's usage steps.
    self._usage_final = None  # (fraction used, perplexity) of the latest usage step.
    self._usage_steps = []  # the steps whose counts are in _usage_total
    for record in restored_usage:
      self._add_usage(record["step"], np.asarray(record["counts"], np.float64))

  def should_log(self, step: int) -> bool:
    """Whether `record(step, ...)` fetches the buffer and writes a log line."""
    return step % self.log_every == 0 or step == self.total_steps

  def should_log_usage(self, step: int) -> bool:
    """Whether the train loop should hand this step's code counts to `record_codebook_usage`."""
    return step % self.usage_every == 0 or step == self.total_steps

  def record(self, step: int, metrics: dict) -> None:
    """Buffers the step's scalar metrics; on log steps fetches, logs and writes them."""
    self._pending.append((step, dict(metrics)))
    self._steps_recorded += 1
    self._last_step = step
    if self.should_log(step):
      self._flush()

  def record_codebook_usage(self, step: int, counts) -> None:
    """Fetches (S, K) code assignment counts; logs and writes usage fraction and perplexity."""
    counts = np.asarray(jax.device_get(counts), np.float64)
    used, perplexity = self._add_usage(step, counts)
    if self.is_writer:
      os.makedirs(os.path.dirname(self._usage_path), exist_ok=True)
      with open(self._usage_path, "a", encoding="utf-8") as f:
        whole = np.rint(counts).astype(np.int64).tolist()
        f.write(json.dumps({"step": step, "counts": whole}) + "\n")
    logging.info("%s step %d/%d codebook usage: used %s | perplexity %s (of %d codes)",
                 self.phase_id, step, self.total_steps,
                 " ".join(f"{u:.3f}" for u in used),
                 " ".join(f"{p:.1f}" for p in perplexity), counts.shape[1])
    if self._writer is not None:
      for s, (u, p) in enumerate(zip(used, perplexity)):
        self._writer.add_scalar(f"{self.phase_id}/codebook{s}_used", float(u), step)
        self._writer.add_scalar(f"{self.phase_id}/codebook{s}_perplexity", float(p), step)

  def _add_usage(self, step: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adds one step's (S, K) counts to the phase's; returns their (used, perplexity)."""
    used, perplexity = codebook_usage_stats(counts)
    self._usage_total = counts if self._usage_total is None else self._usage_total + counts
    self._usage_final = (used, perplexity)
    self._usage_steps.append(step)
    return used, perplexity

  def finish(self) -> dict:
    """Flushes pending metrics, writes the plot, closes the writer and returns the summary.

    Summary: phase, steps (last step), from_step (0, or the step a resumed phase restarted
    at: the timings cover the steps after it), final_loss and mean_loss_last_10pct (of the
    whole phase's loss history), wall_time_s,
    samples_per_s (compilation included; None when this run took no step: a phase resumed
    at its end), steady_samples_per_s (after the first log line; None without a later
    step), codebook_usage ({fraction_used, perplexity} per codebook from the phase's latest
    counts, those of an earlier run of the phase included; None if none were recorded)
    and plot (its path; None when not the writer).
    """
    if self._pending:
      self._flush()
    end_time = time.perf_counter()
    wall_time = end_time - self._start_time
    plot_path = None
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      plot_path = os.path.join(self.workdir, "plots", f"{self.phase_id}.png")
      os.makedirs(os.path.dirname(plot_path), exist_ok=True)
      files.write_atomic(plot_path, self._plot_png())
    losses = [loss for _, loss in self.loss_history]
    tail = losses[-max(1, math.ceil(len(losses) / 10)):]
    steady = None
    if self._first_log is not None and self._steps_recorded > self._first_log[0]:
      steady = ((self._steps_recorded - self._first_log[0]) * self.global_batch_size
                / (end_time - self._first_log[1]))
    return {
        "phase": self.phase_id,
        "steps": self._last_step,
        "from_step": self._first_step,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10pct": float(np.mean(tail)) if losses else None,
        "wall_time_s": wall_time,
        "samples_per_s": (self._steps_recorded * self.global_batch_size / wall_time
                          if self._steps_recorded else None),
        "steady_samples_per_s": steady,
        "codebook_usage": None if self._usage_final is None else {
            "fraction_used": self._usage_final[0].tolist(),
            "perplexity": self._usage_final[1].tolist()},
        "plot": plot_path,
    }

  def sync(self) -> None:
    """Fetches the buffered metrics, appends their losses to the history file and writes
    their TensorBoard scalars.

    The train loop calls it before saving a checkpoint, so the history and the event
    file hold every step the checkpoint does (a resumed run hides the later ones), codebook
    usage scalars included.
    """
    new = self._pending[self._fetched:]
    if not new:
      if self._writer is not None:
        self._writer.flush()
      return
    values = jax.device_get([metrics for _, metrics in new])
    self._pending[self._fetched:] = [(step, v) for (step, _), v in zip(new, values)]
    self._fetched = len(self._pending)
    losses = [(step, float(v["loss"])) for (step, _), v in zip(new, values) if "loss" in v]
    self.loss_history.extend(losses)
    if self.is_writer and losses:
      os.makedirs(os.path.dirname(self._history_path), exist_ok=True)
      with open(self._history_path, "a", encoding="utf-8") as f:
        f.writelines(_loss_line(step, loss) for step, loss in losses)
    if self._writer is not None:
      for (step, _), metrics in zip(new, values):
        for name, value in metrics.items():
          self._writer.add_scalar(f"{self.phase_id}/{name}", float(value), step)
      self._writer.flush()

  def _flush(self) -> None:
    """Fetches and writes the buffered metrics (`sync`), then logs the interval."""
    self.sync()
    steps = [step for step, _ in self._pending]
    values = [metrics for _, metrics in self._pending]
    self._pending, self._fetched = [], 0
    now = time.perf_counter()
    first_interval = self._first_log is None
    steps_per_s = (steps[-1] - self._interval_start_step) / max(now - self._last_log_time, 1e-9)
    self._interval_start_step, self._last_log_time = steps[-1], now
    if first_interval:
      self._first_log = (self._steps_recorded, now)

    names = sorted(set().union(*values),
                   key=lambda name: (name != "loss", name in _POINT_METRICS, name))
    shown = " | ".join(f"{name} {_interval_value(name, values):.4g}" for name in names)
    eta = (self.total_steps - steps[-1]) / steps_per_s if steps_per_s > 0 else float("inf")
    logging.info("%s step %d/%d | %s | %.1f samples/s %.2f steps/s | ETA %s%s",
                 self.phase_id, steps[-1], self.total_steps, shown,
                 steps_per_s * self.global_batch_size, steps_per_s, _hms(eta),
                 " (incl. compile)" if first_interval else "")

  def _plot_png(self) -> bytes:
    """PNG bytes: loss vs step, and sorted code frequencies per codebook when recorded."""
    panels = 1 if self._usage_total is None else 2
    fig = Figure(figsize=(6 * panels, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax = fig.add_subplot(1, panels, 1)
    if self.loss_history:
      loss_steps, losses = zip(*self.loss_history)
      loss_ax.plot(loss_steps, losses, linewidth=1)
    loss_ax.set(title=f"{self.phase_id} loss", xlabel="step", ylabel="loss")
    loss_ax.grid(alpha=0.3)
    if self._usage_total is not None:
      usage_ax = fig.add_subplot(1, panels, 2)
      totals = self._usage_total.sum(-1, keepdims=True)
      freqs = -np.sort(-self._usage_total / np.maximum(totals, 1), axis=-1)
      used, perplexity = codebook_usage_stats(self._usage_total)
      ranks = np.arange(1, freqs.shape[1] + 1)
      for s, row in enumerate(freqs):
        nonzero = row > 0
        usage_ax.step(ranks[nonzero], row[nonzero], where="mid",
                      label=f"codebook {s}: used {used[s]:.0%}, ppl {perplexity[s]:.0f}")
      usage_ax.axhline(1 / freqs.shape[1], color="gray", linestyle=":", label="uniform")
      usage_ax.set_yscale("log")
      usage_ax.set(title=(f"code frequency, sorted (counts of {len(self._usage_steps)} "
                          f"steps, {self._usage_steps[0]}-{self._usage_steps[-1]})"),
                   xlabel="code rank", ylabel="fraction of assignments")
      usage_ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _restore_records(path: str, start_step: int) -> list[dict]:
  """The records of a history file up to start_step; the file is rewritten without the
  later lines (none are kept for a phase that starts at step 0).

  Lines after start_step were written by a run that stopped before its next checkpoint
  (the resumed run redoes those steps); a line cut off by a crash is dropped too.
  """
  kept = []
  if start_step and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if record["step"] <= start_step:
          kept.append(record)
  if kept or os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
  return kept


def _loss_line(step: int, loss: float) -> str:
  return json.dumps({"step": step, "loss": loss if math.isfinite(loss) else None}) + "\n"


def _interval_value(name: str, values: list[dict]) -> float:
  """The log line's value: latest for point metrics, else the mean over the interval."""
  series = [float(metrics[name]) for metrics in values if name in metrics]
  return series[-1] if name in _POINT_METRICS else float(np.mean(series))


def _hms(seconds: float) -> str:
  """h:mm:ss, or '?' when unknown."""
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def _to_json(value):
  """Converts numpy/jax values inside dicts, lists and tuples to JSON-ready Python values."""
  if isinstance(value, dict):
    return {str(key): _to_json(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(item) for item in value]
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _to_json(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value
