"""Tests for the per-phase training monitor (logs, TensorBoard events, plot, summaries)."""
import collections
import json
import logging
import os
import types

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from bridle_jax.train import monitor as monitor_lib

from event_files import read_events


class _DeviceScalar:
  """Stands in for a device value: any host conversion outside jax.device_get fails."""

  def __init__(self, value):
    self.value = value

  def _refuse(self, *args, **kwargs):
    raise AssertionError("device value read outside jax.device_get")

  __float__ = __array__ = __bool__ = __index__ = item = _refuse


def _events(logdir):
  """The events of the event files in `logdir`, file by file."""
  files = [name for name in os.listdir(logdir) if name.startswith("events.out.tfevents")]
  assert files
  for name in sorted(files):
    yield from read_events(os.path.join(logdir, name))


def _read_scalars(logdir):
  """{tag: [(step, value)]} from the event files in `logdir`."""
  scalars = collections.defaultdict(list)
  for event in _events(logdir):
    for value in event.summary.value:
      scalars[value.tag].append((event.step, value.simple_value))
  return scalars


def _fake_clock(monkeypatch, times):
  ticks = iter(times)
  monkeypatch.setattr(monitor_lib, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_record_fetches_only_on_log_steps_and_logs_rates(tmp_path, monkeypatch, caplog):
  fetched_at = []
  current_step = [0]

  def counting_device_get(tree):
    fetched_at.append(current_step[0])
    return jax.tree.map(lambda x: x.value if isinstance(x, _DeviceScalar) else x, tree)

  monkeypatch.setattr(jax, "device_get", counting_device_get)
  _fake_clock(monkeypatch, [0.0, 10.0, 12.0])
  monitor = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r1", total_steps=10,
                                     global_batch_size=8, log_every=4, usage_every=5)
  with caplog.at_level(logging.INFO):
    for step in range(1, 9):
      current_step[0] = step
      monitor.record(step, {"loss": _DeviceScalar(float(step)), "acc": _DeviceScalar(0.5),
                            "lr": _DeviceScalar(step * 1e-3)})
  assert fetched_at == [4, 8]
  assert monitor.loss_history == [(s, float(s)) for s in range(1, 9)]
  lines = [r.getMessage() for r in caplog.records if "encoder_r1 step" in r.getMessage()]
  assert len(lines) == 2
  # Interval means for loss/acc, the log step's value for lr; 4 steps in 10 s, then in 2 s.
  assert lines[0] == ("encoder_r1 step 4/10 | loss 2.5 | acc 0.5 | lr 0.004 | "
                      "3.2 samples/s 0.40 steps/s | ETA 0:00:15 (incl. compile)")
  assert lines[1] == ("encoder_r1 step 8/10 | loss 6.5 | acc 0.5 | lr 0.008 | "
                      "16.0 samples/s 2.00 steps/s | ETA 0:00:01")


def test_event_files_hold_scalars_at_their_steps(tmp_path):
  monitor = monitor_lib.PhaseMonitor(str(tmp_path), "tokenizer_r1", total_steps=5,
                                     global_batch_size=4, log_every=2, usage_every=5)
  for step in range(1, 6):
    monitor.record(step, {"loss": jnp.float32(step * 0.5), "lr": 0.1 * step})
    if monitor.should_log_usage(step):
      monitor.record_codebook_usage(step, jnp.array([[3, 3, 3, 3], [12, 0, 0, 0]]))
  monitor.finish()
  scalars = _read_scalars(tmp_path / "tensorboard" / "tokenizer_r1")
  assert sorted(scalars) == ["tokenizer_r1/codebook0_perplexity", "tokenizer_r1/codebook0_used",
                             "tokenizer_r1/codebook1_perplexity", "tokenizer_r1/codebook1_used",
                             "tokenizer_r1/loss", "tokenizer_r1/lr"]
  assert scalars["tokenizer_r1/loss"] == [(s, pytest.approx(s * 0.5)) for s in range(1, 6)]
  assert scalars["tokenizer_r1/lr"] == [(s, pytest.approx(0.1 * s)) for s in range(1, 6)]
  assert scalars["tokenizer_r1/codebook0_perplexity"] == [(5, pytest.approx(4.0))]
  assert scalars["tokenizer_r1/codebook1_used"] == [(5, pytest.approx(0.25))]


def test_codebook_usage_stats():
  counts = np.array([[5, 5, 5, 5], [0, 7, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]])
  used, perplexity = monitor_lib.codebook_usage_stats(counts)
  np.testing.assert_allclose(used, [1.0, 0.25, 0.5, 0.0])
  np.testing.assert_allclose(perplexity, [4.0, 1.0, 2.0, 0.0], rtol=1e-12)


def test_rejects_non_positive_intervals(tmp_path):
  with pytest.raises(ValueError, match="log_every"):
    monitor_lib.PhaseMonitor(str(tmp_path), "p", total_steps=5, global_batch_size=2, log_every=0,
                             usage_every=1)


def _run_phase(workdir, steps, usage_every=None, **kwargs):
  monitor = monitor_lib.PhaseMonitor(str(workdir), "encoder_r2", total_steps=steps,
                                     global_batch_size=2, log_every=3,
                                     usage_every=usage_every or steps, **kwargs)
  for step in range(1, steps + 1):
    monitor.record(step, {"loss": jnp.float32(100.0 / step)})
    if usage_every and monitor.should_log_usage(step):
      monitor.record_codebook_usage(step, jnp.array([[step, 1, 0, 0], [1, 1, 1, 1]]))
  return monitor.finish()


def test_finish_writes_plot_and_summary(tmp_path):
  summary = _run_phase(tmp_path, 20, usage_every=10)
  path = tmp_path / "plots" / "encoder_r2.png"
  assert summary["plot"] == str(path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.image.imread(path).shape[:2] == (400, 1200)  # Loss and usage panels.
  assert os.listdir(tmp_path / "plots") == ["encoder_r2.png"]
  assert summary["steps"] == 20 and summary["from_step"] == 0
  assert summary["final_loss"] == pytest.approx(5.0)
  assert summary["mean_loss_last_10pct"] == pytest.approx((100 / 19 + 100 / 20) / 2)
  assert summary["samples_per_s"] > 0 and summary["steady_samples_per_s"] > 0
  assert summary["codebook_usage"]["fraction_used"] == [0.5, 1.0]
  assert summary["codebook_usage"]["perplexity"][1] == pytest.approx(4.0)


def _history(workdir, phase="encoder_r2"):
  with open(workdir / "history" / f"{phase}.jsonl") as f:
    return [json.loads(line) for line in f]


def test_a_resumed_phase_summarises_the_whole_phase(tmp_path):
  # The first run logged up to step 8 but its last checkpoint is at step 6, then a
  # crash cut a line in half.
  first = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r2", total_steps=10,
                                   global_batch_size=2, log_every=4, usage_every=10)
  for step in range(1, 9):
    first.record(step, {"loss": jnp.float32(100 + step)})
  with open(tmp_path / "history" / "encoder_r2.jsonl", "a") as f:
    f.write('{"step": 9, "lo')

  resumed = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r2", total_steps=10,
                                     global_batch_size=2, log_every=4, usage_every=10,
                                     start_step=6)
  for step in range(7, 11):  # redone after the checkpoint, with other losses
    resumed.record(step, {"loss": jnp.float32(step)})
  summary = resumed.finish()
  expected = [(s, 100.0 + s) for s in range(1, 7)] + [(s, float(s)) for s in range(7, 11)]
  assert resumed.loss_history == expected
  assert [(r["step"], r["loss"]) for r in _history(tmp_path)] == expected
  assert (summary["from_step"], summary["steps"]) == (6, 10)
  # TensorBoard drops the first run's events from step 7 on when it reads the restart.
  assert _starts(tmp_path / "tensorboard" / "encoder_r2") == [1, 7]
  assert summary["final_loss"] == pytest.approx(10.0)
  assert summary["mean_loss_last_10pct"] == pytest.approx(10.0)  # 1 of 10 losses
  at_the_end = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r2", total_steps=10,
                                        global_batch_size=2, log_every=4, usage_every=10,
                                        start_step=10).finish()  # killed in its last save
  assert at_the_end["samples_per_s"] is None and at_the_end["final_loss"] == pytest.approx(10.0)


def test_a_phase_resumed_at_its_end_keeps_its_codebook_usage(tmp_path):
  """Usage at steps 3, 6, 9; the checkpoint is at 6. The resumed run redoes 9 with other
  counts and ends at 10; a run killed in the last save then resumes at 10 and takes no
  step: its summary still reports the usage of step 10, and its plot all four steps."""
  def monitor(start_step):
    return monitor_lib.PhaseMonitor(str(tmp_path), "tokenizer_r2", total_steps=10,
                                    global_batch_size=2, log_every=5, usage_every=3,
                                    start_step=start_step)
  first = monitor(0)
  for step in (3, 6, 9):
    first.record_codebook_usage(step, jnp.array([[step, 0, 0, 0], [1, 1, 0, 0]]))
  resumed = monitor(6)
  resumed.record_codebook_usage(9, jnp.array([[1, 1, 1, 0], [0, 0, 0, 0]]))
  resumed.record_codebook_usage(10, jnp.array([[2, 2, 2, 2], [5, 0, 0, 0]]))
  assert resumed.finish()["codebook_usage"]["fraction_used"] == [1.0, 0.25]

  at_the_end = monitor(10).finish()
  assert at_the_end["codebook_usage"]["fraction_used"] == [1.0, 0.25]
  assert at_the_end["codebook_usage"]["perplexity"] == [pytest.approx(4.0), 1.0]
  with open(tmp_path / "history" / "tokenizer_r2.usage.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [3, 6, 9, 10]
  assert records[2]["counts"] == [[1, 1, 1, 0], [0, 0, 0, 0]]
  assert matplotlib.image.imread(at_the_end["plot"]).shape[:2] == (400, 1200)  # with usage
  assert monitor(0).finish()["codebook_usage"] is None  # a fresh start forgets them


def test_tensorboard_keeps_every_step_across_a_checkpoint_and_resume(tmp_path):
  """Stopped at step 7 right after its checkpoint (log lines at 5 and 10): the event files
  still show steps 6 and 7, and the resumed run's 8 to 12 once each."""
  first = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r1", total_steps=12,
                                   global_batch_size=2, log_every=5, usage_every=12)
  for step in range(1, 8):
    first.record(step, {"loss": jnp.float32(step)})
  first.sync()  # before the step-7 checkpoint; then the process is preempted
  resumed = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r1", total_steps=12,
                                     global_batch_size=2, log_every=5, usage_every=12,
                                     start_step=7)
  for step in range(8, 13):
    resumed.record(step, {"loss": jnp.float32(step)})
  resumed.finish()
  steps = [step for step, _ in _read_scalars(tmp_path / "tensorboard" / "encoder_r1")[
      "encoder_r1/loss"]]
  assert sorted(steps) == list(range(1, 13))  # each step once


def test_usage_scalars_of_a_checkpoint_step_are_on_disk_after_sync(tmp_path):
  """Step 4 logs, then records usage, then checkpoints (sync with nothing new to fetch): a
  kill right after must not lose the usage points, which a resumed run never rewrites."""
  monitor = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r1", total_steps=8,
                                     global_batch_size=2, log_every=4, usage_every=4)
  for step in range(1, 5):
    monitor.record(step, {"loss": jnp.float32(step)})
  monitor.record_codebook_usage(4, jnp.array([[3, 3, 3, 3]]))
  monitor.sync()  # the process is killed here: the writer is never closed
  scalars = _read_scalars(tmp_path / "tensorboard" / "encoder_r1")
  assert scalars["encoder_r1/codebook0_used"] == [(4, pytest.approx(1.0))]


def test_a_fresh_phase_discards_an_old_history(tmp_path):
  _run_phase(tmp_path, 5)
  summary = _run_phase(tmp_path, 3)
  assert [r["step"] for r in _history(tmp_path)] == [1, 2, 3]
  assert summary["final_loss"] == pytest.approx(100 / 3)
  # Each run restarts TensorBoard at step 1, hiding the earlier run's events.
  assert _starts(tmp_path / "tensorboard" / "encoder_r2") == [1, 1]


def _starts(logdir):
  """The steps of the SessionLog STARTs in `logdir`'s event files, sorted: the file
  names do not order the writers (their counter is not zero-padded)."""
  return sorted(e.step for e in _events(logdir)
                if e.HasField("session_log") and e.session_log.status == e.session_log.START)


def test_sync_writes_the_history_without_breaking_the_log_interval(tmp_path, caplog):
  monitor = monitor_lib.PhaseMonitor(str(tmp_path), "encoder_r2", total_steps=8,
                                     global_batch_size=2, log_every=4, usage_every=8)
  with caplog.at_level(logging.INFO):
    for step in range(1, 5):
      monitor.record(step, {"loss": jnp.float32(step), "acc": jnp.float32(step % 2)})
      if step in (2, 3):  # checkpoints at steps 2 and 3
        monitor.sync()
        assert [r["step"] for r in _history(tmp_path)] == list(range(1, step + 1))
  lines = [r.getMessage() for r in caplog.records if "encoder_r2 step" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("encoder_r2 step 4/8 | loss 2.5 | acc 0.5 |")
  assert [r["loss"] for r in _history(tmp_path)] == [1.0, 2.0, 3.0, 4.0]


def test_finish_without_usage_flushes_and_plots_loss_only(tmp_path):
  summary = _run_phase(tmp_path, 4)  # Step 4 is not a log step: finish() flushes it.
  assert matplotlib.image.imread(tmp_path / "plots" / "encoder_r2.png").shape[:2] == (400, 600)
  assert summary["codebook_usage"] is None
  assert summary["final_loss"] == pytest.approx(25.0)
  assert summary["steps"] == 4


def test_write_summary_converts_values_atomically(tmp_path):
  summary = {"encoder_r1": {"final_loss": np.float32(1.5), "steps": np.int64(7),
                            "perplexity": np.array([1.0, 2.5]), "lr": jnp.float32(0.25),
                            "diverged": float("nan"), "shape": (2, 3)}}
  path = monitor_lib.write_summary(str(tmp_path), summary)
  assert os.listdir(tmp_path) == ["summary.json"]
  text = open(path, encoding="utf-8").read()
  assert "\n  " in text  # Pretty-printed.
  assert json.loads(text) == {"encoder_r1": {"final_loss": 1.5, "steps": 7,
                                             "perplexity": [1.0, 2.5], "lr": 0.25,
                                             "diverged": None, "shape": [2, 3]}}


def test_non_writer_writes_no_files(tmp_path):
  summary = _run_phase(tmp_path, 6, usage_every=3, is_writer=False)
  assert not os.listdir(tmp_path)
  assert summary["plot"] is None
  assert summary["final_loss"] == pytest.approx(100 / 6)
