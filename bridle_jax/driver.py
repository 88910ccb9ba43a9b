"""Runs the configured rounds of phases and hands checkpoints from one phase to the next.

Phases are named `p<i>_<kind>` in `config.rounds` order (e.g. p1_encoder, p2_tokenizer,
p3_encoder). An encoder phase that no tokenizer or joint phase precedes (in this run or
in the `init_from` workdir) uses the frozen cold-start tokenizer. Each phase starts from the previous phase's final
parameters and codebooks, with a fresh optimizer and schedule; tokenizer and joint
phases, and the cold-start phase, start from fresh codebooks, k-means-initialised on
their first batch. Progress lives in WORKDIR/progress.json and the per-phase orbax
checkpoints, so rerunning the same command after an interruption resumes the phase in
progress at its last checkpoint, data position included.
"""
import collections
import dataclasses
import functools
import os

import flax.linen as nn
import jax
from absl import logging

from bridle_jax import workdir as workdir_lib
from bridle_jax.data import inputs
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.evaluate import verdict
from bridle_jax.models import platform
from bridle_jax.train import checkpoint
from bridle_jax.train import code_cache
from bridle_jax.train import device_memory
from bridle_jax.train import monitor
from bridle_jax.train import optim
from bridle_jax.train import preemption
from bridle_jax.train import sharding
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps

STEPS_IN_FLIGHT = 2  # how far the host may run ahead of the device, in steps


@dataclasses.dataclass(frozen=True)
class Phase:
  index: int
  kind: str  # encoder | tokenizer | joint

  @property
  def id(self) -> str:
    return f"p{self.index + 1}_{self.kind}"


def phases(config) -> list[Phase]:
  return [Phase(i, kind) for i, kind in enumerate(config.rounds)]


def _trains_tokenizer(kinds) -> bool:
  return any(kind in ("tokenizer", "joint") for kind in kinds)


class Trainer:
  """Holds what all phases share: config, mesh, models, data source."""

  def __init__(self, config, workdir: str, devices=None):
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.models = state_lib.build_models(config)
    self.compiler_options = platform.model_compiler_options(config.model)
    self.source = sources.open_source(config.data)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    abstract = workdir_lib.abstract_pretrained(self.models)
    self.handoff_shardings = sharding.shardings_for(abstract, self.mesh, config.sharding_rules)
    self.handoff_abstract = sharding.with_shardings(nn.unbox(abstract), self.handoff_shardings)
    self.init_from_phases = workdir_lib.init_from_phases(workdir, config)
    self.preemption = preemption.PreemptionNotice()
    self.loss_histories = {}  # phase id -> [(step, loss)] of the phases this trainer ran

  def uses_cold_start(self, phase: Phase) -> bool:
    """An encoder phase with no tokenizer training before it (here or in init_from)."""
    earlier = list(self.config.rounds[:phase.index])
    earlier += [phase_id.split("_", 1)[1] for phase_id in self.init_from_phases]
    return phase.kind == "encoder" and not _trains_tokenizer(earlier)

  def run(self) -> dict:
    """Runs every unfinished phase; returns the summary written to summary.json."""
    if os.path.exists(os.path.join(self.workdir, workdir_lib.CONFIG_FILE)):
      workdir_lib.check_compatible(self.config, self.workdir)
      workdir_lib.check_resumable(self.config, self.workdir)
    if self.config.init_from:
      workdir_lib.check_compatible(self.config, self.config.init_from, fields=("model",))
    workdir_lib.save_config(self.config, self.workdir)
    progress = checkpoint.read_progress(self.workdir)
    if "init_from_phases" not in progress:
      progress["init_from_phases"] = self.init_from_phases
      checkpoint.write_progress(self.workdir, progress)
    completed = progress.setdefault("completed", [])
    summaries = progress.setdefault("phases", {})
    for kind in dict.fromkeys(p.kind for p in phases(self.config) if p.id not in completed):
      self.check_batch(kind)  # before days of earlier phases, not when this kind's starts
    handoff = None
    for phase in phases(self.config):
      if phase.id in completed:
        continue
      self.preemption.stop_if_requested(f"{phase.id}: preempted before it started")
      if handoff is None and not workdir_lib.has_phase_checkpoint(self.workdir, phase.id):
        handoff = self._starting_point(phase)  # a resumed phase restores its own state
      phase_config = self.config[f"{phase.kind}_phase"]
      with device_memory.fields_on_out_of_memory(
          f"{phase.kind}_phase", phase_config.batch_size, sharding.batch_shards(self.mesh),
          phase_config.grad_accum):
        summaries[phase.id], handoff = self.run_phase(phase, handoff)
      completed.append(phase.id)
      checkpoint.write_progress(self.workdir, progress)
    summary = {"workdir": self.workdir, "phases": summaries}
    monitor.write_summary(self.workdir, summary)
    return summary

  def check_batch(self, kind: str) -> None:
    """Raises ValueError naming the field when `<kind>_phase`'s batch cannot be formed."""
    phase_config = self.config[f"{kind}_phase"]
    if pipeline.steps_per_epoch(self.source, phase_config.batch_size) == 0:
      raise ValueError(f"{kind}_phase.batch_size={phase_config.batch_size} exceeds "
                       f"the {len(self.source)} clips of data.manifest")
    sharding.check_batch_divides(f"{kind}_phase.batch_size", phase_config.batch_size,
                                 self.mesh, phase_config.grad_accum)

  def _starting_point(self, phase: Phase):
    """The params and codebooks a phase starts from (None: fresh initialisation)."""
    if phase.index > 0:
      previous = phases(self.config)[phase.index - 1]
      return self.load_handoff(workdir_lib.final_dir(self.workdir, previous.id))
    if self.config.init_from:
      if not self.init_from_phases:
        raise ValueError(f"init_from: {self.config.init_from} holds no finished phase")
      last = self.init_from_phases[-1]
      return self.load_handoff(workdir_lib.final_dir(self.config.init_from, last))
    return None

  def load_handoff(self, directory: str) -> dict:
    return workdir_lib.restore_final(directory, self.handoff_abstract)

  def run_phase(self, phase: Phase, handoff: dict | None):
    """Trains one phase to its end; returns (phase summary, handoff for the next)."""
    run = self.setup_phase(phase, handoff)
    config = self.config
    step = int(run.state.step)
    self.preemption.stop_if_requested(
        f"{phase.id}: preempted at step {step}/{run.total}, while setting it up")
    phase_monitor = monitor.PhaseMonitor(
        self.workdir, phase.id, run.total, run.batch_size, config.log_every,
        config.usage_every, is_writer=jax.process_index() == 0, start_step=step)
    window = StepWindow(STEPS_IN_FLIGHT)
    with run.checkpointer.commits_on_error():
      while step < run.total:
        host_batch = run.next_batch()
        batch = self.device_batch(host_batch)
        if run.code_reuse is not None:
          batch = run.code_reuse.attach(run.state, host_batch, batch)
        if run.restart_step is not None and step and step % run.restart_every == 0:
          run.state = run.restart_step(run.state, batch)
        run.state, metrics, counts = run.step_fn(step)(run.state, batch)
        window.push(metrics["loss"])
        step += 1
        phase_monitor.record(step, metrics)
        if phase_monitor.should_log_usage(step):
          phase_monitor.record_codebook_usage(step, counts)
        due_save = run.checkpointer.should_save(step) or step == run.total
        if due_save or phase_monitor.should_log(step):
          self._check_finite(run)
        if due_save:
          phase_monitor.sync()
          run.checkpointer.save(step, run.state, run.iterator.get_state(), force=step == run.total)
        if self.preemption.requested():
          phase_monitor.sync()
          run.checkpointer.save(step, run.state, run.iterator.get_state(), force=True)
          run.checkpointer.wait()
          raise preemption.Preempted(preemption.stop_message(phase.id, step, run.total))
    run.checkpointer.wait()
    run.checkpointer.close()

    handoff = state_lib.handoff_tree(run.state)
    final = checkpoint.PhaseCheckpointer(workdir_lib.final_dir(self.workdir, phase.id),
                                         save_every=1, keep=1, async_save=False)
    final.save(run.total, handoff, None, force=True)
    final.close()
    summary = phase_monitor.finish()
    self.loss_histories[phase.id] = phase_monitor.loss_history
    summary.update(skipped_clips=run.iterator.skipped_clips_of_all_hosts(),
                   cold_start=run.cold_start, steps=run.total)
    if run.code_reuse is not None:
      summary.update(batches_with_reused_codes=run.code_reuse.reused_batches)
    logging.info("%s: done, %s", phase.id, summary)
    return summary, handoff

  def setup_phase(self, phase: Phase, handoff: dict | None) -> "PhaseRun":
    """The state (resumed from this phase's checkpoint if any), data and compiled steps."""
    config, models = self.config, self.models
    phase_config = config[f"{phase.kind}_phase"]
    cold_start = self.uses_cold_start(phase)
    steps_per_epoch = pipeline.steps_per_epoch(self.source, phase_config.batch_size)
    total = phase_config.steps or phase_config.epochs * steps_per_epoch
    warmup = round(total * phase_config.warmup_epochs / phase_config.epochs)
    tx = optim.adamw_direction(phase_config)
    schedule = jax.device_put(
        optim.warmup_cosine(phase_config.lr, phase_config.min_lr, warmup, total), self.replicated)
    groups = steps.PHASE_GROUPS[phase.kind]
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), phase.index)

    fresh = state_lib.fresh_state_fn(models, groups, tx)
    abstract = jax.eval_shape(fresh, rng)
    shardings = sharding.shardings_for(abstract, self.mesh, config.sharding_rules)
    batch_shardings = {k: self.batch_sharding for k in inputs.batch_keys(config.data)}
    ckpt = checkpoint.PhaseCheckpointer(
        os.path.join(self.workdir, "checkpoints", phase.id),
        save_every=config.checkpoint_every, keep=config.keep_checkpoints)
    stream = functools.partial(pipeline.DataStream, self.source, config.data,
                               global_batch_size=phase_config.batch_size,
                               seed=config.seed + phase.index)
    pending = None
    if ckpt.latest_step() is not None:
      state, data_state = ckpt.restore(sharding.with_shardings(nn.unbox(abstract), shardings))
      iterator = stream(saved=data_state)
      logging.info("%s: resumed at step %d", phase.id, int(state.step))
    else:
      iterator = stream()
      state = self._initial_state(phase, fresh, rng, handoff, groups, tx, shardings, cold_start)
      if phase.kind != "encoder" or cold_start:
        pending = next(iterator)
        state = self._codebook_step(shardings, batch_shardings, cold_start, kmeans=True)(
            state, self.device_batch(pending))
    restart_every = phase_config.get("restart_unused_every", 0)
    restart_step = (self._codebook_step(shardings, batch_shardings, cold_start, kmeans=False)
                    if restart_every else None)

    code_reuse = None
    if phase.kind == "encoder" and phase_config.get("reuse_codes", False):
      code_reuse = self._code_reuse(shardings, batch_shardings, cold_start)
      batch_shardings = {**batch_shardings, "codes": self.batch_sharding}

    def compile_step(**kwargs):
      """(state, batch) -> step outputs; the schedule goes in as an input, not as constants."""
      fn = steps.phase_step(models, phase.kind, phase_config, tx, cold_start=cold_start, **kwargs)
      program = jax.jit(fn, in_shardings=(shardings, batch_shardings, self.replicated),
                        out_shardings=(shardings, self.replicated, self.replicated),
                        donate_argnums=0, compiler_options=self.compiler_options)
      return lambda state, batch: program(state, batch, schedule)

    encoder_only_step = compile_step(with_tokenizer=False) if phase.kind == "joint" else None
    logging.info("%s: %d steps (%d per epoch), batch %d%s", phase.id, total, steps_per_epoch,
                 phase_config.batch_size, ", cold-start tokenizer" if cold_start else "")
    return PhaseRun(phase=phase, total=total, batch_size=phase_config.batch_size,
                    cold_start=cold_start, state=state, iterator=iterator, checkpointer=ckpt,
                    pending=pending, code_reuse=code_reuse, restart_step=restart_step,
                    restart_every=restart_every, train_step=compile_step(),
                    encoder_only_step=encoder_only_step,
                    tokenizer_every=phase_config.get("tokenizer_every", 1))

  def _codebook_step(self, shardings, batch_shardings, cold_start: bool, kmeans: bool):
    """Jitted `steps.prepare_codebooks`: k-means + restart, or the periodic restart alone."""
    models = self.models
    return jax.jit(
        lambda s, b: steps.prepare_codebooks(s, b, models=models, cold_start=cold_start,
                                             kmeans=kmeans),
        in_shardings=(shardings, batch_shardings), out_shardings=shardings, donate_argnums=0)

  def _code_reuse(self, shardings, batch_shardings, cold_start: bool) -> code_cache.CodeReuse:
    """Codes of the frozen tokenizer, computed once per clip (`encoder_phase.reuse_codes`)."""
    models = self.models
    spec = models.quantizer
    codes_fn = jax.jit(
        lambda s, b: steps.codes_step(s, b, models=models, cold_start=cold_start),
        in_shardings=(shardings, batch_shardings), out_shardings=self.batch_sharding,
        compiler_options=self.compiler_options)
    cache = code_cache.CodeCache(len(self.source), models.encoder.num_patches,
                                 spec.num_codebooks * spec.soft_code, spec.codebook_size,
                                 jax.process_count())
    return code_cache.CodeReuse(cache, codes_fn, self.batch_sharding)

  def _check_finite(self, run: "PhaseRun") -> None:
    steps.check_skipped_updates(run.phase.id, int(run.state.skipped_updates),
                                self.config.max_nonfinite_updates)

  def _initial_state(self, phase, fresh, rng, handoff, groups, tx, shardings, cold_start):
    """Step 0 of a phase: handed-over params (or fresh ones), fresh optimizer."""
    if handoff is None:
      return jax.jit(lambda r: nn.unbox(fresh(r)), out_shardings=shardings)(rng)
    reinit_encoder = phase.kind == "encoder" and self.config.encoder_from_scratch
    fresh_codebooks = phase.kind != "encoder" or cold_start

    def start(handoff, rng):
      initial = nn.unbox(fresh(rng))
      params = dict(handoff["params"])
      if reinit_encoder:
        params.update(state_lib.group_params(initial.params, "encoder"))
      codebooks = initial.codebooks if fresh_codebooks else handoff["codebooks"]
      return state_lib.new_state(params, codebooks, groups, tx, initial.rng)

    return jax.jit(start, out_shardings=shardings)(handoff, rng)

  def device_batch(self, host_batch: dict) -> dict:
    """The step's inputs of a host batch, as global arrays sharded over the batch axes."""
    keys = inputs.batch_keys(self.config.data)
    return pipeline.to_device_batch({k: host_batch[k] for k in keys}, self.batch_sharding)


class StepWindow:
  """Keeps the host at most `depth` dispatched steps ahead of the device.

  With asynchronous dispatch the loop can enqueue steps much faster than the device runs
  them when the input pipeline is fast, and every queued step holds its uploaded batch in
  device memory until the next log step waits for them all. Waiting for step t - depth
  before preparing step t + 1 bounds that, and still leaves the device `depth` steps of
  work, so it does not idle.
  """

  def __init__(self, depth: int):
    self._depth = depth
    self._markers = collections.deque()

  def push(self, marker: jax.Array) -> None:
    """Records a just-dispatched step by one of its outputs; waits for the oldest if full."""
    self._markers.append(marker)
    if len(self._markers) > self._depth:
      self._markers.popleft().block_until_ready()


@dataclasses.dataclass
class PhaseRun:
  """A phase ready to train: its state, data iterator, checkpointer and compiled steps."""
  phase: Phase
  total: int
  batch_size: int
  cold_start: bool
  state: state_lib.TrainState
  iterator: object
  checkpointer: checkpoint.PhaseCheckpointer
  pending: dict | None  # the first batch, already used to initialise the codebooks
  code_reuse: code_cache.CodeReuse | None  # encoder_phase.reuse_codes
  restart_step: object | None  # <phase>.restart_unused_every > 0: dead-code restart
  restart_every: int
  train_step: object
  encoder_only_step: object | None  # joint phase: steps without the tokenizer term
  tokenizer_every: int

  def next_batch(self) -> dict:
    batch, self.pending = self.pending, None
    return batch if batch is not None else next(self.iterator)

  def step_fn(self, step: int):
    """The joint phase adds the tokenizer term on every `tokenizer_every`-th step."""
    if self.encoder_only_step is None or step % self.tokenizer_every == 0:
      return self.train_step
    return self.encoder_only_step


def train(config, workdir: str) -> dict:
  """Runs (or resumes) every phase of `config.rounds` in `workdir`.

  A demo run (`data.demo_dir` set) ends with a verdict: a probe of the pretrained
  encoder against a randomly initialised one, merged into summary.json.
  """
  trainer = Trainer(config, workdir)
  summary = trainer.run()
  if config.data.demo_dir:
    trainer.preemption.stop_if_requested("the demo verdict: preempted before it ran")
    summary.update(verdict.run_verdict(config, workdir))
    monitor.write_summary(workdir, summary)
  return summary
