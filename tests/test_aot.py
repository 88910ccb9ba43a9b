"""Compiling the train step for a GPU or TPU that this machine does not have."""
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.experimental.compilation_cache import compilation_cache

from bridle_jax import aot
from bridle_jax import aot_targets
from bridle_jax import hlo_kernels
from bridle_jax.models import attention, decoder, layers, platform
import cpu_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda_plugin = pytest.mark.skipif(
    all(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is None for v in (12, 13)),
    reason="needs jax's CUDA plugin: pip install -e '.[aot]'")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu: pip install -e '.[aot]'")

# An optimised module as XLA prints it: a matmul fusion, a cuDNN attention call, an
# all-reduce, a host callback, and a loop of 4 trips around an element-wise fusion.
HLO = """HloModule step, entry_computation_layout={()->()}

%fused_add (p0: f32[4,8], p1: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %add.1 = f32[4,8]{1,0} add(%p0, %p1)
}

%gemm_fusion (g0: bf16[4,8], g1: bf16[8,16]) -> bf16[4,16] {
  %g0 = bf16[4,8]{1,0} parameter(0)
  %g1 = bf16[8,16]{1,0} parameter(1)
  ROOT %dot.2 = bf16[4,16]{1,0} dot(%g0, %g1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %f = f32[4,8]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%i, %f)
}

%cond (c: (s32[], f32[4,8])) -> pred[] {
  %c = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: f32[4,8], b: bf16[4,8], w: bf16[8,16]) -> (s32[], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[4,8]{1,0} parameter(1)
  %w = bf16[8,16]{1,0} parameter(2)
  %m = bf16[4,16]{1,0} fusion(%b, %w), kind=kCustom, calls=%gemm_fusion
  %att = (bf16[4,8]{1,0}, u8[0]{0}) custom-call(%b, %b, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %ar = f32[4,8]{1,0} all-reduce(%a), replica_groups={}, to_apply=%sum
  %cb = f32[4,8]{1,0} custom-call(%ar), custom_call_target="xla_ffi_python_gpu_callback"
  %zero = s32[] constant(0)
  %t0 = (s32[], f32[4,8]{1,0}) tuple(%zero, %cb)
  ROOT %loop = (s32[], f32[4,8]{1,0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
}
"""


def test_kernel_table_counts_kinds_bytes_and_loop_trips():
  assert hlo_kernels.kernel_table(HLO) == {
      "matmul": (1, 64 + 256 + 128),
      "attention": (1, 3 * 64 + 64),
      "fusion": (4, 4 * 3 * 128),  # two reads and one write of f32[4,8] per trip
      "collective": (1, 2 * 128),
      "host transfer": (1, 2 * 128),
  }


def test_kernel_table_needs_an_entry_computation():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_kernels.kernel_table(HLO.replace("ENTRY ", ""))


def test_compiling_for_a_gpu_takes_its_kernels_only_inside():
  def choices():
    return (attention.resolve("auto", jnp.bfloat16, 64),
            decoder.resolve_window_impl("auto", jnp.bfloat16, 16, 32))

  assert choices() == ("xla", "xla")
  with platform.compiling_for("gpu"):
    assert choices() == ("cudnn", "pallas")
    with platform.compiling_for("tpu"):
      assert choices() == ("xla", "xla")
    assert platform.backend() == "gpu"
  assert platform.backend() == "cpu"
  with pytest.raises(ValueError, match="'rocm'"):
    with platform.compiling_for("rocm"):
      pass


def test_target_names_and_memory_fraction():
  with pytest.raises(ValueError, match="'h300'"):
    aot_targets.resolve("h300")
  with pytest.raises(ValueError, match="neither a GPU"):
    aot_targets.resolve("h100:x8")
  gpu = aot_targets.Target("gpu", [], "NVIDIA H100 80GB HBM3", 80 * aot_targets.GIB)
  assert aot.usable_memory(gpu, {}) == 60 * aot_targets.GIB
  assert aot.usable_memory(gpu, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}) == 72 * aot_targets.GIB
  with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
    aot.usable_memory(gpu, {"XLA_PYTHON_CLIENT_MEM_FRACTION": "most"})
  assert aot.gpu_compiler_flags("--a=1") == "--a=1 --xla_gpu_enable_triton_gemm=false"
  assert aot.gpu_compiler_flags("--xla_gpu_enable_triton_gemm=true") == (
      "--xla_gpu_enable_triton_gemm=true")


@needs_cuda_plugin
def test_gpu_targets_have_their_devices_and_memory():
  target = aot_targets.resolve("h100:2x8")
  assert (target.platform, len(target.devices)) == ("gpu", 16)
  assert target.memory_per_device == aot_targets.GPU_MODELS["h100"].memory_bytes
  assert aot_targets.resolve("H200").device_kind == "NVIDIA H200"


def _gradient_hlo_for_h100(module, input_shape) -> str:
  """The optimised HLO of the gradient of sum(module(x)²) in bf16, compiled for an H100
  as the train steps are (`platform.compiler_options`), with matmuls as cuBLAS calls
  (the form whose epilogues XLA fills)."""
  target = aot_targets.resolve("h100")
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(target.devices, ("d",)),
                                          jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct(input_shape, jnp.bfloat16, sharding=replicated)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated),
                        jax.eval_shape(module.init, jax.random.PRNGKey(0), x))

  def loss(params, x):
    return jnp.sum(module.apply(params, x).astype(jnp.float32) ** 2)

  # Off the tests' persistent compilation cache, which holds programs for this machine.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    with platform.compiling_for("gpu"):
      options = platform.compiler_options(gpu_matmuls="cublas")
      return jax.jit(jax.grad(loss)).lower(params, x).compile(options).as_text()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def _forward_epilogues(hlo: str, layer: str) -> list[str]:
  """The epilogues of the forward cuBLAS calls whose op name passes through `layer`."""
  return [re.search(r'"epilogue":"(\w+)"', line)[1] for line in hlo.splitlines()
          if "__cublas$lt$matmul" in line and re.search(rf'op_name="[^"]*/{layer}/', line)
          and "transpose(" not in line]


@needs_cuda_plugin
@pytest.mark.parametrize("form, epilogue", [("exact", "BIAS"), ("tanh", "BIAS_GELU_AUX")])
def test_tanh_gelu_folds_into_the_fc1_matmul_on_a_gpu(form, epilogue):
  """Compiled for an H100, the tanh GELU and fc1's bias become the cuBLAS call's epilogue,
  which also writes fc1's output for the backward; the exact GELU is a pass of its own.
  Either backward fuses the GELU's slope into fc1's bias-gradient sum instead of writing
  the float32 product out."""
  # The decoder MLP's shapes at batch 256: XLA's fusion choices depend on them.
  hlo = _gradient_hlo_for_h100(layers.Mlp(dtype=jnp.bfloat16, gelu=form), (256, 512, 512))
  assert _forward_epilogues(hlo, "fc1") == [epilogue], hlo
  assert not re.search(r"= f32\[256,512,2048\]\S* fusion\(", hlo), hlo


@needs_cuda_plugin
def test_the_q_bias_is_added_inside_its_matmul_on_a_gpu():
  """Compiled for an H100, the ViT attention's q, k and v come from three cuBLAS calls,
  q's with its bias as the epilogue, and cuDNN takes them as written: no pass over q, k or
  v between the matmuls and the attention call. At 8 samples XLA would merge the three
  matmuls into one and copy its slices, but for `platform.compiler_options`."""
  module = layers.Attention(num_heads=12, dtype=jnp.bfloat16)
  hlo = _gradient_hlo_for_h100(module, (8, 514, 768))
  assert sorted(_forward_epilogues(hlo, "qkv")) == ["BIAS", "DEFAULT", "DEFAULT"], hlo
  assert not re.search(r"= bf16\[8,514,(12,64|768)\]\S* fusion\(", hlo), hlo


def test_steps_for_a_gpu_are_compiled_without_matmul_merging(monkeypatch):
  """Only programs for a GPU get the options, `model.gpu_matmuls=cublas` switches Triton
  matmuls off, and XLA_FLAGS naming an option wins."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert platform.compiler_options() == {}  # this CPU
  assert platform.compiler_options("cublas") == {}
  with platform.compiling_for("gpu"):
    assert platform.compiler_options() == {"xla_gpu_dot_merger_threshold_mb": 0}
    model = ml_collections.ConfigDict({"gpu_matmuls": "cublas"})
    assert platform.model_compiler_options(model) == {
        "xla_gpu_dot_merger_threshold_mb": 0, "xla_gpu_enable_triton_gemm": False}
    assert platform.model_compiler_options(ml_collections.ConfigDict()) == {
        "xla_gpu_dot_merger_threshold_mb": 0}  # a config saved before the field
    with pytest.raises(ValueError, match="model.gpu_matmuls='triton'"):
      platform.compiler_options("triton")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_dot_merger_threshold_mb=32 "
                       "--xla_gpu_enable_triton_gemm=true")
    assert platform.compiler_options("cublas") == {}


@needs_libtpu
def test_tpu_targets_have_their_devices_and_memory():
  target = aot_targets.resolve("v5e:2x2")
  assert (target.platform, len(target.devices), target.device_kind) == (
      "tpu", 4, "TPU v5 lite")
  assert target.memory_per_device == 16 * aot_targets.GIB
  with pytest.raises(ValueError, match="v5e:3x3"):
    aot_targets.resolve("v5e:3x3")


def _aot(tmp_path, *args) -> str:
  result = subprocess.run(
      [sys.executable, "-m", "bridle_jax.aot", "--config=configs/audio.py:demo",
       "--config.model.dtype=bfloat16", f"--hlo_dir={tmp_path}", *args],
      cwd=REPO_ROOT, env=cpu_env.subprocess_env(1), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _peak_mib(report: str, batch: int) -> float:
  """The peak memory per device printed for `batch`, in MiB."""
  match = re.search(rf"global batch {batch} .*\n  memory per device at peak: ([\d.]+) (GiB|MiB)",
                    report)
  return float(match[1]) * (1024 if match[2] == "GiB" else 1)


@needs_cuda_plugin
def test_encoder_step_compiles_for_an_h100_with_cudnn_and_the_window_kernel(tmp_path):
  out = _aot(tmp_path, "--phase=encoder", "--batch=8", "--target=h100")
  assert "encoder: global batch 8 on 1 x NVIDIA H100 80GB HBM3" in out
  assert "usable: fits" in out and "no host transfers in the step" in out
  for kind in ("matmul", "attention", "pallas kernel", "fusion"):
    assert f"\n    {kind} " in out, out
  assert 1 < _peak_mib(out, 8) < 1024
  hlo = (tmp_path / "encoder_8.hlo").read_text()
  assert "__cudnn$fmhaSoftmaxBackward" in hlo and "__gpu$xla.gpu.triton" in hlo
  assert len(_forward_epilogues(hlo, "Encoder.transform/blocks_0/attn/qkv")) == 3  # unmerged


@needs_libtpu
def test_tokenizer_step_compiles_for_a_tpu_slice_and_reports_what_does_not_fit(tmp_path):
  out = _aot(tmp_path, "--phase=tokenizer", "--batch=8,65536", "--target=v5e:2x2")
  assert "global batch 8 on 4 x TPU v5 lite, mesh data 4 x fsdp 1 x model 1" in out
  assert "of 16.00 GiB usable: fits" in out and 1 < _peak_mib(out, 8) < 1024
  assert "\n    collective " in out  # the gradients' all-reduce over the 4 chips
  assert "global batch 65536 on 4 x TPU v5 lite: DOES NOT FIT" in out
  assert (tmp_path / "tokenizer_8.hlo").exists()
  assert not (tmp_path / "tokenizer_65536.hlo").exists()
