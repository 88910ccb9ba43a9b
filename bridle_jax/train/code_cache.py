"""Host memory of the frozen tokenizer's codes per clip, for `encoder_phase.reuse_codes`.

In an encoder phase the tokenizer and codebooks are frozen, so when the input is not
augmented a clip's codes never change: they are computed the first time the clip is seen
and read back on later epochs, which skips the tokenizer's forward pass (about a third of
the ViT-B encoder phase's FLOPs). Each host keeps the clips of its own shard (records
process_index, process_index + process_count, ...): ViT-B on AudioSet-2M (2M clips, 512
patches, 4 codebooks of 256) takes 4 GiB on one host, 1 GiB on each of 4. It is not
checkpointed: a resumed phase fills it again during its first epoch.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils

from bridle_jax.data import pipeline


class CodeCache:
  """codes[i] (patches, codes per patch) for the source records i of one host's shard.

  The shard holds the records i with i % process_count == process_index; record i lives
  in row i // process_count.
  """

  def __init__(self, num_clips: int, num_patches: int, codes_per_patch: int,
               codebook_size: int, process_count: int = 1):
    dtype = np.uint8 if codebook_size <= 256 else np.uint16
    rows = -(-num_clips // process_count)
    self._process_count = process_count
    self._codes = np.zeros((rows, num_patches, codes_per_patch), dtype)
    self._stored = np.zeros(rows, bool)

  def lookup(self, indices: np.ndarray) -> np.ndarray | None:
    """int32 codes (len(indices), patches, codes per patch) if all are stored, else None."""
    rows = np.asarray(indices) // self._process_count
    if not self._stored[rows].all():
      return None
    return self._codes[rows].astype(np.int32)

  def store(self, indices: np.ndarray, codes: np.ndarray) -> None:
    rows = np.asarray(indices) // self._process_count
    self._codes[rows] = codes
    self._stored[rows] = True

  @property
  def num_stored(self) -> int:
    return int(self._stored.sum())


class CodeReuse:
  """Gives each encoder-phase batch its codes: stored ones, or fresh ones that get stored.

  Fresh codes come from `codes_fn(state, device_batch)` (the jitted tokenizer forward);
  they are copied to the host one step later, when they are long computed. In a
  multi-process job the hosts agree on each batch: stored codes are used only when every
  host has its rows, so all of them run the same programs in the same order.
  """

  def __init__(self, cache: CodeCache, codes_fn, batch_sharding):
    self.cache = cache
    self._codes_fn = codes_fn
    self._sharding = batch_sharding
    self._pending = None
    self.reused_batches = 0

  def attach(self, state, host_batch: dict, device_batch: dict) -> dict:
    """device_batch with 'codes' (B, patches, codes per patch) for `host_batch['index']`."""
    self.flush()
    indices = np.asarray(host_batch["index"])
    stored = self.cache.lookup(indices)
    if jax.process_count() > 1:
      everywhere = multihost_utils.process_allgather(np.bool_(stored is not None)).all()
      stored = stored if everywhere else None
    if stored is None:
      codes = self._codes_fn(state, device_batch)
      self._pending = (indices, codes)
    else:
      codes = pipeline.to_device_batch(stored, self._sharding)
      self.reused_batches += 1
    return {**device_batch, "codes": codes}

  def flush(self) -> None:
    """Stores the codes computed for the previous batch."""
    if self._pending is None:
      return
    indices, codes = self._pending
    self._pending = None
    if jax.process_count() > 1:
      codes = multihost_utils.global_array_to_host_local_array(
          codes, self._sharding.mesh, self._sharding.spec)
    self.cache.store(indices, np.asarray(codes))
