"""Forward + backward time of each attention variant at a config's shapes.

  python -m bridle_jax.benchmark_attention --config=configs/audio.py --batch=128

Cases: global attention at the sequence lengths of the masked encoder (CLS + visible
patches), the full-input ViTs (CLS + all patches) and the estimator (all patches), with
XLA and, on a GPU, cuDNN for each padding multiple in --pads; and the decoder's shifted
window attention (`decoder.WindowAttention`, meta-MLP bias and shift mask included) with
XLA and, on a GPU, the Pallas kernel, and the kernel alone with each size of Triton
program in KERNEL_TILINGS. Inputs are random, in the config's dtype; each time is the
median over --repeats loops of --steps calls, in ms per call. A variant the backend
refuses is listed with its error. The fastest padding is what `attention.CUDNN_BLOCK`
should be on that GPU.
"""
import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from ml_collections import config_flags

from bridle_jax import benchmark
from bridle_jax.models import attention
from bridle_jax.models import decoder as decoder_lib
from bridle_jax.models import window_attention_kernel
from bridle_jax.train import state as state_lib


# (windows per program, warps per program) of the Pallas window kernel to time.
KERNEL_TILINGS = ((4, 1), (8, 1), (8, 2), (8, 4), (16, 2))


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
  flags.DEFINE_integer("batch", 128, "Samples per call.")
  flags.DEFINE_list("pads", ["1", "2", "8", "64", "128"],
                    "cuDNN padding multiples to try (1: no padding).")
  flags.DEFINE_integer("steps", 20, "Calls per timed loop.")
  flags.DEFINE_integer("warmup", 3, "Untimed calls first.")
  flags.DEFINE_integer("repeats", 3, "Timed loops; the time is their median.")


def _time(fn, args, steps: int, warmup: int, repeats: int) -> float:
  """Median ms per call of a jitted fn."""
  def run(n):
    out = None
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)

  return 1e3 * benchmark.median_seconds(run, steps, warmup, repeats)


def _global_case(batch, length, heads, head_dim, dtype, implementation, pad_to):
  """(jitted fwd+bwd, args) of `attention.attend` on random q, k, v."""
  keys = jax.random.split(jax.random.key(length), 4)
  q, k, v, cotangent = (jax.random.normal(key, (batch, length, heads, head_dim), dtype)
                        for key in keys)

  def loss(q, k, v):
    out = attention.attend(q, k, v, implementation, pad_to=pad_to)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v)


def _shifted_windows(dec, grid):
  """(window, windows per sample, tokens per window, shift mask) of the decoder config."""
  window = tuple(dec.window)
  num_windows = (grid[0] // window[0]) * (grid[1] // window[1])
  return (window, num_windows, window[0] * window[1],
          decoder_lib.shift_attention_mask(grid, window, dec.shift))


def _window_case(batch, dec, grid, dtype, implementation):
  """(jitted fwd+bwd, args) of the shifted window attention on random windows."""
  window, num_windows, n, mask = _shifted_windows(dec, grid)
  module = decoder_lib.WindowAttention(dec.num_heads, window, dtype=dtype,
                                       attention_impl=implementation)
  x = jax.random.normal(jax.random.key(1), (batch, num_windows, n, dec.width), dtype)
  params = jax.jit(lambda key, x: module.init(key, x, mask))(jax.random.key(0), x[:1])

  def loss(params, x):
    return jnp.sum(module.apply(params, x, mask).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def _kernel_case(batch, dec, grid, dtype, windows_per_program, num_warps):
  """(jitted fwd+bwd, args) of the Pallas window kernel alone on a random fused qkv."""
  _, num_windows, n, mask = _shifted_windows(dec, grid)
  heads = dec.num_heads
  keys = jax.random.split(jax.random.key(2), 3)
  qkv = jax.random.normal(keys[0], (batch, num_windows, n, 3, heads, dec.width // heads),
                          dtype)
  bias = jax.random.normal(keys[1], (heads, n, n))
  cotangent = jax.random.normal(keys[2], (batch, num_windows, n, heads, qkv.shape[-1]), dtype)

  def loss(qkv, inv_tau, bias):
    out = window_attention_kernel.window_attention(
        qkv, inv_tau, bias, mask, windows_per_program=windows_per_program, num_warps=num_warps)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (qkv, jnp.ones((heads,)), bias)


def cases(config, batch: int, pads) -> list[tuple[str, str, object]]:
  """(shape label, variant label, thunk building (fn, args)) for every case."""
  models = state_lib.build_models(config)
  model = config.model
  dtype = jnp.dtype(model.dtype)
  heads, head_dim = model.num_heads, model.width // model.num_heads
  patches = models.encoder.num_patches
  visible = benchmark.encoder_tokens(models)
  on_gpu = jax.default_backend() == "gpu"
  variants = [("xla", "xla", 1)]
  if on_gpu:
    variants += [(f"cudnn pad {p}", "cudnn", p) for p in pads]
  out = []
  for label, length in ((f"global {visible} tokens (masked encoder)", visible),
                        (f"global {patches + 1} tokens (full-input ViTs)", patches + 1),
                        (f"global {patches} tokens (estimator)", patches)):
    seen = set()
    for name, impl, pad in variants:
      padded = length + (-length % pad if impl == "cudnn" else 0)
      if (impl, padded) in seen:
        continue
      seen.add((impl, padded))
      out.append((label, f"{name} -> {padded}" if impl == "cudnn" else name,
                  lambda length=length, impl=impl, pad=pad: _global_case(
                      batch, length, heads, head_dim, dtype, impl, pad)))
  grid = models.decoder.grid
  dec = model.decoder
  if dec.mode == 1:
    for impl in ("xla", "pallas") if on_gpu else ("xla",):
      out.append((f"decoder windows {tuple(dec.window)}, shifted", impl,
                  lambda impl=impl: _window_case(batch, dec, grid, dtype, impl)))
    for windows, warps in KERNEL_TILINGS if on_gpu else ():
      out.append((f"decoder windows {tuple(dec.window)}, kernel only",
                  f"pallas {windows} windows, {warps} warps",
                  lambda windows=windows, warps=warps: _kernel_case(
                      batch, dec, grid, dtype, windows, warps)))
  return out


def run(config, batch: int, pads, steps: int, warmup: int, repeats: int) -> list[dict]:
  """One row per case: shape, variant, ms per call (fwd + bwd) or the error."""
  rows = []
  for shape, variant, build in cases(config, batch, pads):
    try:
      fn, args = build()
      rows.append({"shape": shape, "variant": variant,
                   "ms": _time(fn, args, steps, warmup, repeats)})
    except Exception as e:  # a refused variant is a result, not a failure
      rows.append({"shape": shape, "variant": variant, "error": str(e).splitlines()[0][:120]})
  return rows


def format_rows(rows: list[dict], device) -> str:
  lines = [f"{device.device_kind}, jax {jax.__version__}: forward + backward, ms per call"]
  for row in rows:
    result = f"{row['ms']:9.3f}" if "ms" in row else f"refused: {row['error']}"
    lines.append(f"  {row['shape']:<44} {row['variant']:<22} {result}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    pads = [int(p) for p in flags.FLAGS.pads]
  except ValueError as e:
    raise app.UsageError(f"--pads takes integers: {e}") from e
  if any(p < 1 for p in pads):
    raise app.UsageError("--pads must be positive")
  rows = run(flags.FLAGS.config, flags.FLAGS.batch, pads, flags.FLAGS.steps,
             flags.FLAGS.warmup, flags.FLAGS.repeats)
  print(format_rows(rows, jax.devices()[0]))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
