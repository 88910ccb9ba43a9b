"""Embeddings from a pretrained encoder: a Python API and a CLI that embeds a whole manifest.

The encoder runs without masking on the clip's fbank, exactly as in pretraining (the
pretraining config's sample rate, mel bins, frame count and normalisation); patch embeddings
are its final-norm outputs at the patch tokens (CLS dropped), pooled embeddings their mean.
Clips longer than `target_length` frames are cut to their start, shorter ones zero-padded.
An encoder pretrained on images sees each image with its shorter side resized to
image_size / 0.875 and centre-cropped, normalised as in pretraining (`embed_images`; the
CLI and `embed_files` read image files, and image manifests name their file "image").

  from bridle_jax.evaluate import embeddings
  embedder = embeddings.Embedder.from_workdir("/runs/bridle")        # last finished phase
  out = embedder.embed_waveforms([wave_a, wave_b], sample_rate=44100)  # numpy, resampled
  out["patch"]   # (B, L, D) float32
  out["pooled"]  # (B, D) float32
  out = embedder.embed_files(["a.wav", "b.flac"])                     # + out["failed"]

  python -m bridle_jax.evaluate.embeddings --workdir=PRETRAIN_WORKDIR --manifest=M.json \
      --label_csv=class_labels_indices.csv --output=emb.npz [--patch]

The npz holds, in manifest order: `pooled` (N, D) float32, `patch` (N, L, D) with --patch,
`labels` (N, C) uint8 multi-hot, `paths` (N,), `class_names` (C,) and `failed`, the indices of
clips that could not be read. A failed clip keeps its row, filled with NaN, so row i is always
entry i; each one is logged and they are counted in the printed report. Output is
deterministic: the same inputs give the same file.
With --patch the patch rows go to a scratch memory map beside the output and stream from
it into the npz, so memory stays at about one batch; the disk needs twice their size.
"""
import argparse
import concurrent.futures
import json
import os
import tempfile
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import soxr
from absl import logging
from PIL import Image

from bridle_jax import files
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import audio
from bridle_jax.data import image
from bridle_jax.data import inputs
from bridle_jax.data import sources
from bridle_jax.models import classifier
from bridle_jax.models import platform
from bridle_jax.models import vit

DEFAULT_BATCH_SIZE = 32
DECODE_THREADS = 4


def prepare_waveform(waveform, sample_rate: int, target_sr: int) -> np.ndarray:
  """(T,) or (T, channels) samples at `sample_rate` -> mono, DC-free float32 at `target_sr`.

  Float samples are taken as they are (full scale 1); integer PCM (int16 from
  scipy.io.wavfile, int32, unsigned 8-bit) is scaled to full scale 1 as a file decode does.
  """
  wave = np.asarray(waveform)
  if np.issubdtype(wave.dtype, np.integer):
    info = np.iinfo(wave.dtype)
    offset = (int(info.max) + 1) // 2 if info.min == 0 else 0  # unsigned PCM centres on 128
    wave = (wave.astype(np.float64) - offset) / (int(info.max) + 1 - offset)
  elif not np.issubdtype(wave.dtype, np.floating):
    raise ValueError(f"expected float or integer PCM samples, got dtype {wave.dtype}")
  wave = wave.astype(np.float32)
  if not np.isfinite(wave).all():
    raise ValueError("the waveform holds NaN or infinite samples")
  if wave.ndim == 2 and wave.shape[1] > wave.shape[0]:
    raise ValueError(f"expected (T, channels) samples, got shape {wave.shape}: a "
                     "(channels, T) array (torchaudio, librosa) needs a transpose")
  if wave.ndim == 2:
    wave = wave.mean(axis=1, dtype=np.float32)
  if wave.ndim != 1 or wave.size == 0:
    raise ValueError(f"expected a non-empty (T,) or (T, channels) waveform, got {wave.shape}")
  if sample_rate != target_sr:
    num_samples = wave.size
    wave = soxr.resample(wave, sample_rate, target_sr, quality="HQ")
    if wave.size == 0:
      raise ValueError(f"{num_samples} samples are too few to resample from {sample_rate} Hz")
  return (wave - wave.mean()).astype(np.float32)


def clip_batches(source: Sequence[dict], data_config, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, dict, list[int]]]:
  """Decodes `source` in order, unaugmented: (indices, batch dict, failed indices) per batch.

  The batch holds `inputs.batch_keys` arrays. Unreadable records are logged and reported
  in `failed`; their rows are zeros.
  """
  def load(index):
    try:
      return inputs.load_plain(source[index], data_config)
    except inputs.DecodeError as e:
      logging.warning("Unreadable clip %d: %s", index, e)
      return None

  blank = inputs.blank(data_config)
  with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
    for start in range(0, len(source), batch_size):
      indices = np.arange(start, min(start + batch_size, len(source)))
      loaded = list(pool.map(load, indices))
      failed = [int(i) for i, example in zip(indices, loaded) if example is None]
      yield indices, inputs.stack([blank if ex is None else ex for ex in loaded]), failed


def random_encoder_params(model_config, data_config, rng: jax.Array) -> dict:
  """Freshly initialised encoder params (unboxed) for the data config's input size."""
  encoder = vit.encoder_from_config(model_config, classifier.input_grid(model_config, data_config))
  x = jnp.zeros((1, *inputs.input_shape(data_config)), jnp.float32)
  return nn.unbox(jax.jit(encoder.init)(rng, x)["params"])


class Embedder:
  """Runs a pretrained encoder (unmasked) on clips or images; batches are padded to
  `batch_size`."""

  def __init__(self, model_config, data_config, encoder_params: dict,
               batch_size: int = DEFAULT_BATCH_SIZE):
    self.data = data_config
    self._features = inputs.device_features(data_config)
    self.encoder = vit.encoder_from_config(model_config,
                                           classifier.input_grid(model_config, data_config))
    self.params = encoder_params
    self.batch_size = batch_size
    self._forward = jax.jit(self._embed_batch, static_argnames="with_patch",
                            compiler_options=platform.model_compiler_options(model_config))

  @classmethod
  def from_workdir(cls, workdir: str, phase_id: str | None = None,
                   target_length: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> "Embedder":
    """The encoder of a finished phase (default: the last) of a pretraining workdir.

    `target_length` (frames) replaces the pretraining clip length; a shorter clip takes
    its fixed pos rows from the pretraining table (`model.pos_crop` says which).
    """
    config, _, tree = workdir_lib.load_pretrained(workdir, phase_id)
    data = ml_collections.ConfigDict(config.data.to_dict())
    model = ml_collections.ConfigDict(config.model.to_dict())
    if target_length:
      if inputs.modality(data) != "audio":
        raise ValueError(f"target_length is for audio; this run pretrained on "
                         f"{inputs.modality(data)}s")
      if target_length % config.model.patch_size:
        raise ValueError(f"target_length {target_length} is not a multiple of the patch size "
                         f"{config.model.patch_size}")
      model.pos_table_frames = data.target_length
      data.target_length = target_length
    return cls(model, data, tree["params"]["encoder"], batch_size)

  def _embed_batch(self, params, batch, with_patch: bool):
    features, _, _ = self.encoder.apply({"params": params}, self._features(batch, None),
                                        apply_mask=False)
    patch = features[:, 1:].astype(jnp.float32)
    return {"patch": patch, "pooled": patch.mean(axis=1)} if with_patch else {
        "pooled": patch.mean(axis=1)}

  def embed_prepared(self, batch: dict, with_patch: bool = True) -> dict:
    """{'pooled'[, 'patch']} of a batch as `clip_batches` yields it (without `with_patch`
    the patch embeddings are neither kept nor copied off the device)."""
    count = len(next(iter(batch.values())))
    pad = -count % self.batch_size
    batch = {key: np.concatenate([value, np.zeros((pad, *value.shape[1:]), value.dtype)])
             for key, value in batch.items()}
    outputs = [jax.device_get(self._forward(
        self.params, {key: value[start:start + self.batch_size] for key, value in batch.items()},
        with_patch=with_patch)) for start in range(0, count + pad, self.batch_size)]
    return {key: np.concatenate([out[key] for out in outputs])[:count] for key in outputs[0]}

  def embed_waveforms(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> dict:
    """{'patch' (B, L, D), 'pooled' (B, D)} of raw waveforms at `sample_rate` (resampled)."""
    self._require_modality("audio")
    fitted = [audio.pad_or_crop(prepare_waveform(w, sample_rate, self.data.sample_rate),
                                self.data.target_length, self.data.sample_rate)
              for w in waveforms]
    return self.embed_prepared({"waveform": np.stack([w for w, _ in fitted]),
                                "valid_frames": np.asarray([v for _, v in fitted], np.int32)})

  def embed_images(self, images: Sequence[np.ndarray]) -> dict:
    """{'patch' (B, L, D), 'pooled' (B, D)} of RGB images, (H, W, 3) uint8 arrays of any
    size, resized and centre-cropped as in evaluation."""
    self._require_modality("image")
    crops = []
    for img in images:
      img = np.asarray(img)
      if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
      crops.append(image.eval_crop(Image.fromarray(img), self.data.image_size))
    return self.embed_prepared({"image": np.stack(crops)})

  def _require_modality(self, name: str) -> None:
    if inputs.modality(self.data) != name:
      raise ValueError(f"this encoder was pretrained on {inputs.modality(self.data)} input, "
                       f"not {name}")

  def embed_files(self, paths: Sequence[str]) -> dict:
    """{'patch', 'pooled', 'failed'} of audio (or, for an image encoder, image) files;
    failed files get NaN rows."""
    records = [{"path": os.fspath(p), "audio": b""} for p in paths]
    return self.embed_source(records, include_patch=True)

  def embed_source(self, source: Sequence[dict], include_patch: bool = False,
                   patch_file: str | None = None) -> dict:
    """Embeds every record of a source in order; {'pooled', 'failed'[, 'patch']}.

    Rows are written in place as batches finish, so the peak memory is the result and one
    batch. With `patch_file`, 'patch' is a .npy memory map there instead of an array in
    memory (AudioSet-sized exports: 1.5 MB per 10 s clip at ViT-B).
    """
    width = self.encoder.width
    result = {"pooled": np.empty((len(source), width), np.float32), "failed": []}
    if include_patch:
      shape = (len(source), self.encoder.num_patches, width)
      result["patch"] = (np.empty(shape, np.float32) if patch_file is None else
                         np.lib.format.open_memmap(patch_file, "w+", np.float32, shape))
    for indices, batch, batch_failed in clip_batches(source, self.data, self.batch_size):
      out = self.embed_prepared(batch, with_patch=include_patch)
      result["pooled"][indices] = out["pooled"]
      if include_patch:
        result["patch"][indices] = out["patch"]
      result["failed"].extend(batch_failed)
    result["failed"] = np.asarray(result["failed"], np.int64)
    for key in ("pooled", "patch"):
      if key in result:
        result[key][result["failed"]] = np.nan
    return result


def multi_hot_labels(source) -> np.ndarray:
  """(N, C) uint8 multi-hot labels of a source, from its label table."""
  values, offsets = source.label_table()
  labels = np.zeros((len(source), len(source.class_names)), np.uint8)
  rows = np.repeat(np.arange(len(source)), np.diff(offsets))
  labels[rows, values] = 1
  return labels


def write_npz(path: str, arrays: dict) -> None:
  """Writes `arrays` as an uncompressed npz, atomically; the arrays stream to the file
  (memory maps included) rather than being copied into one buffer first."""
  with files.atomic_output(path) as f:
    np.savez(f, **arrays)


def embed_manifest(workdir: str, manifest: str, output: str, *, label_csv: str = "",
                   data_format: str = "json", phase_id: str | None = None,
                   target_length: int | None = None, include_patch: bool = False,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
  """Embeds every clip of a manifest into `output` (npz, see the module doc); returns a report."""
  embedder = Embedder.from_workdir(workdir, phase_id, target_length, batch_size)
  source = sources.open_source(ml_collections.ConfigDict(
      {"format": data_format, "manifest": manifest, "label_csv": label_csv,
       "modality": inputs.modality(embedder.data)}))
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  # Patch embeddings go to a memory map beside the output and stream from it into the npz.
  with tempfile.TemporaryDirectory(dir=os.path.dirname(output), prefix=".tmp_patch_") as scratch:
    out = embedder.embed_source(source, include_patch,
                                patch_file=os.path.join(scratch, "patch.npy"))
    paths = [source[i]["path"] for i in range(len(source))]
    arrays = {"pooled": out["pooled"], "labels": multi_hot_labels(source),
              "paths": np.asarray(paths), "class_names": np.asarray(source.class_names),
              "failed": out["failed"]}
    if include_patch:
      arrays["patch"] = out["patch"]
    write_npz(output, arrays)
    report = {"output": output, "clips": len(source),
              "failed": int(len(out["failed"])),
              "failed_paths": [paths[i] for i in out["failed"][:20]],
              "pooled_shape": list(out["pooled"].shape)}
    if include_patch:
      report["patch_shape"] = list(out["patch"].shape)
  return report


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True, help="pretraining workdir")
  parser.add_argument("--manifest", required=True,
                      help="json manifest (or class-folder root / TFDS dir with --format)")
  parser.add_argument("--label_csv", default="", help="class_labels_indices.csv (json format)")
  parser.add_argument("--format", default="json", choices=sources.FORMATS)
  parser.add_argument("--output", required=True, help="output .npz")
  parser.add_argument("--phase", default=None, help="finished phase id (default: the last)")
  parser.add_argument("--target_length", type=int, default=0,
                      help="fbank frames per clip (default: the pretraining value)")
  parser.add_argument("--patch", action="store_true", help="also write patch embeddings")
  parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
  args = parser.parse_args(argv)
  try:
    report = embed_manifest(args.workdir, args.manifest, args.output, label_csv=args.label_csv,
                            data_format=args.format, phase_id=args.phase,
                            target_length=args.target_length or None,
                            include_patch=args.patch, batch_size=args.batch_size)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
