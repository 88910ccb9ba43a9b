"""A step that runs out of device memory fails with the config fields that fix it."""
import os

import jax
import pytest

from bridle_jax import driver
from bridle_jax import prepare as prepare_lib
from bridle_jax.data import demo
from bridle_jax.train import device_memory
from configs import audio as audio_config

_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.20GiB.\nBuffer list:"


def test_pretraining_section_names_batch_grad_accum_and_remat():
  with pytest.raises(device_memory.OutOfDeviceMemory) as error:
    with device_memory.fields_on_out_of_memory("encoder_phase", 1024, shards=1, grad_accum=2):
      raise jax.errors.JaxRuntimeError(_OOM)
  message = str(error.value)
  assert message.startswith("encoder_phase: out of device memory with "
                            "encoder_phase.batch_size=1024, encoder_phase.grad_accum=2 "
                            "(512 samples per device per step)")
  assert "raise encoder_phase.grad_accum" in message and "model.remat=full" in message
  assert message.endswith("81.20GiB.")  # XLA's first line only
  assert isinstance(error.value, ValueError)  # main reports ValueErrors as one line


def test_section_without_grad_accum_suggests_the_batch():
  with pytest.raises(device_memory.OutOfDeviceMemory, match=r"finetune.batch_size=64 \(8 "):
    with device_memory.fields_on_out_of_memory("finetune", 64, shards=8):
      raise jax.errors.JaxRuntimeError(_OOM)


def test_other_errors_pass_unchanged():
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    with device_memory.fields_on_out_of_memory("encoder_phase", 64, shards=1, grad_accum=1):
      raise jax.errors.JaxRuntimeError("INTERNAL: cuDNN failed")
  with pytest.raises(KeyError):
    with device_memory.fields_on_out_of_memory("encoder_phase", 64, shards=1, grad_accum=1):
      raise KeyError("x")


def test_out_of_memory_names_the_phase_keeps_the_checkpoint_and_resumes_with_accumulation(
    tmp_path, monkeypatch):
  corpus = demo.write_demo_corpus(tmp_path / "corpus", clips_per_class=4,
                                  eval_clips_per_class=1)
  config = audio_config.get_config("demo")
  config.data.update(demo_dir="", manifest=corpus["train"], label_csv=corpus["label_csv"])
  config.rounds = ("encoder",)
  config.encoder_phase.update(steps=4, batch_size=32, grad_accum=2)  # 8 devices
  config.checkpoint_every = 2
  workdir = str(tmp_path / "work")
  prepare_lib.prepare(config, workdir)
  real_step_fn = driver.PhaseRun.step_fn

  def step_fn(run, step):
    if step == 2:  # the step after the first checkpoint allocates too much
      raise jax.errors.JaxRuntimeError(_OOM)
    return real_step_fn(run, step)

  monkeypatch.setattr(driver.PhaseRun, "step_fn", step_fn)
  with pytest.raises(device_memory.OutOfDeviceMemory,
                     match=r"^encoder_phase: .* encoder_phase.batch_size=32, "
                           r"encoder_phase.grad_accum=2 \(\d+ samples per device per step\)"):
    driver.train(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints", "p1_encoder")) == ["2"]
  # The remedy the error names: the same run with more accumulation resumes at step 2.
  monkeypatch.setattr(driver.PhaseRun, "step_fn", real_step_fn)
  config.encoder_phase.grad_accum = 4
  summary = driver.train(config, workdir)
  assert summary["phases"]["p1_encoder"]["from_step"] == 2
  assert summary["phases"]["p1_encoder"]["steps"] == 4
