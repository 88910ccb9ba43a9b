"""Codebook plumbing of the driver: tokenizer-code reuse, periodic dead-code restarts and
the joint phase's targets."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from bridle_jax import config_validation
from bridle_jax import driver
from bridle_jax import prepare as prepare_lib
from bridle_jax.data import demo
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.models import quantizer
from bridle_jax.train import code_cache
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps
from configs import audio as audio_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return demo.write_demo_corpus(tmp_path_factory.mktemp("corpus"), clips_per_class=4,
                                eval_clips_per_class=1)


def _config(corpus, workdir, reuse: bool):
  config = audio_config.get_config("demo")
  config.data.demo_dir = ""
  config.data.manifest = corpus["train"]
  config.data.label_csv = corpus["label_csv"]
  config.data.roll_mag_aug = False
  config.rounds = ("encoder",)
  config.encoder_phase.reuse_codes = reuse
  prepare_lib.prepare(config, str(workdir))
  return config


def test_cache_answers_only_when_every_clip_is_stored():
  cache = code_cache.CodeCache(num_clips=10, num_patches=3, codes_per_patch=2, codebook_size=256)
  codes = np.arange(12).reshape(2, 3, 2)
  cache.store(np.array([7, 2]), codes)
  assert cache.num_stored == 2
  assert cache.lookup(np.array([2, 5])) is None
  got = cache.lookup(np.array([2, 7, 2]))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, codes[[1, 0, 1]])
  wide = code_cache.CodeCache(2, 1, 1, codebook_size=1024)
  wide.store(np.array([1]), np.array([[[1000]]]))
  assert wide.lookup(np.array([1]))[0, 0, 0] == 1000
  # Host 1 of 3 holds records 1, 4, 7, 10 in 4 rows.
  shard = code_cache.CodeCache(11, 1, 1, codebook_size=256, process_count=3)
  shard.store(np.array([10, 1]), np.array([[[5]], [[6]]]))
  np.testing.assert_array_equal(shard.lookup(np.array([1, 10]))[:, 0, 0], [6, 5])
  assert shard.lookup(np.array([4])) is None


def test_stats_of_codes_count_like_quantize():
  spec = quantizer.QuantizerSpec(num_codebooks=3, codebook_size=16, code_dim=8, soft_code=2)
  state = quantizer.init(spec, jax.random.key(0))
  z = jax.random.normal(jax.random.key(1), (2, 5, 8))
  _, codes, _, stats = quantizer.quantize(spec, state, z)
  np.testing.assert_array_equal(quantizer.stats_of_codes(spec, codes).counts, stats.counts)


def test_batches_carry_the_source_index_of_each_clip(corpus):
  config = audio_config.get_config("demo")
  config.data.manifest, config.data.label_csv = corpus["train"], corpus["label_csv"]
  source = sources.open_source(config.data)
  batch = next(iter(pipeline.build_dataset(source, config.data, global_batch_size=8, seed=3,
                                           process_index=1, process_count=2)))
  assert sorted(set(batch["index"] % 2)) == [1]  # host 1 holds the odd records
  for index, label in zip(batch["index"], batch["label"]):
    assert np.flatnonzero(label).tolist() == list(source[int(index)]["labels"])


def test_reused_codes_train_exactly_like_recomputed_ones(corpus, tmp_path):
  """Batches made only of clips seen before read stored codes; training does not change."""
  results = {}
  for reuse in (False, True):
    config = _config(corpus, tmp_path / str(reuse), reuse)
    num_clips, batch = len(sources.open_source(config.data)), config.encoder_phase.batch_size
    config.encoder_phase.steps = total = 3 * num_clips // batch
    trainer = driver.Trainer(config, str(tmp_path / str(reuse)))
    summary, handoff = trainer.run_phase(driver.phases(config)[0], None)
    results[reuse] = summary, jax.device_get(handoff["params"]["encoder"])
  (plain, plain_params), (reused, reused_params) = results[False], results[True]
  assert "batches_with_reused_codes" not in plain
  # Every clip is in the first epoch, so batch k is all stored iff it starts after it.
  assert reused["batches_with_reused_codes"] == sum(k * batch >= num_clips for k in range(total))
  assert reused["batches_with_reused_codes"] > 0
  np.testing.assert_allclose(reused["final_loss"], plain["final_loss"], rtol=1e-5)
  # The two steps are different programs, so float32 rounding differs (up to 2e-6 seen);
  # one step trained on other codes moves parameters by about the learning rate, 1e-3.
  for a, b in zip(jax.tree.leaves(plain_params), jax.tree.leaves(reused_params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_reuse_needs_unaugmented_input(corpus, tmp_path):
  config = _config(corpus, tmp_path, reuse=True)
  config.data.roll_mag_aug = True
  config.data.timem = 8
  with pytest.raises(config_validation.ConfigError,
                     match=r"^encoder_phase.reuse_codes: .*data.roll_mag_aug, data.timem"):
    config_validation.validate_config(config)


def test_periodic_restart_replaces_dead_codes_without_kmeans(corpus, tmp_path):
  """kmeans=False: live codes stay, dead ones move onto batch vectors, no k-means rerun."""
  config = _config(corpus, tmp_path, reuse=False)
  trainer = driver.Trainer(config, str(tmp_path))
  models = trainer.models
  state = trainer.setup_phase(driver.Phase(0, "tokenizer"), None).state
  batch = trainer.device_batch(next(iter(pipeline.build_dataset(
      trainer.source, config.data, global_batch_size=16, seed=0))))
  books = np.array(state.codebooks.codebooks)
  books[:, :4] = 0.0
  books[:, :4, 0] = 10.0  # far-off rows: codes 0-3 of every stage are dead
  state = state.replace(codebooks=state.codebooks.replace(codebooks=books))
  x = models.features(batch, None)
  z = models.tokenizer.apply({"params": state.params["tokenizer"]}, x, cold_start=False)
  counts = quantizer.quantize(models.quantizer, state.codebooks, z)[3].counts
  dead = np.asarray(counts) == 0
  assert dead[:, :4].all()

  restarted = steps.prepare_codebooks(state, batch, models=models, cold_start=False,
                                      kmeans=False).codebooks.codebooks
  np.testing.assert_array_equal(np.asarray(restarted)[~dead], books[~dead])
  assert not np.isclose(np.asarray(restarted)[dead], books[dead]).all(axis=-1).any()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(restarted)[dead], axis=-1), 1.0,
                             rtol=1e-5)
  # The cold-start tokenizer keeps its codebooks, as the reference's cold-start run does.
  cold = steps.prepare_codebooks(state, batch, models=models, cold_start=True, kmeans=False)
  np.testing.assert_array_equal(np.asarray(cold.codebooks.codebooks), books)


def test_driver_restarts_every_n_steps(corpus, tmp_path, monkeypatch):
  config = _config(corpus, tmp_path, reuse=False)
  config.rounds = ("tokenizer",)
  config.tokenizer_phase.steps = 7
  config.tokenizer_phase.restart_unused_every = 3
  calls = []
  build = driver.Trainer._codebook_step

  def counting(self, *args, kmeans):
    step_fn = build(self, *args, kmeans=kmeans)

    def wrapped(state, batch):
      calls.append((kmeans, int(state.step)))
      return step_fn(state, batch)
    return wrapped

  monkeypatch.setattr(driver.Trainer, "_codebook_step", counting)
  driver.Trainer(config, str(tmp_path)).run()
  assert calls == [(True, 0), (False, 3), (False, 6)]


def test_joint_targets_are_the_codes_before_the_steps_ema():
  """The reference takes the joint phase's encoder targets from an eval-mode tokenizer
  pass (codebooks before this step's EMA); its tokenizer loss looks rows up after it."""
  config = audio_config.get_config("demo")
  config.model.quantizer.decay = 0.5  # a large EMA step: later stages' codes then move
  models = state_lib.build_models(config)
  params = jax.jit(lambda key: nn.unbox(state_lib.init_params(models, key)))(jax.random.key(0))
  x = jax.random.normal(jax.random.key(2), (2, *models.input_shape))
  z = models.tokenizer.apply({"params": params["tokenizer"]}, x)
  codebooks = quantizer.init(models.quantizer, jax.random.key(1))
  targets = steps._estimate(models, params, codebooks, x)[0]
  frozen = steps.tokenizer_codes(models, params, codebooks, x, cold_start=False)[0]
  np.testing.assert_array_equal(targets, frozen)
  training = quantizer.quantize(models.quantizer, codebooks, z, training=True)[1]
  assert not np.array_equal(training, frozen)
