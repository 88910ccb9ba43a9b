"""The step profiler: the summary of a GPU-shaped trace, and a traced run on the CPU."""
import glob
import json

import jax
import pytest

from bridle_jax import profile_step
from configs import audio as audio_config

# Two traced steps on one GPU: a gemm (named by an hlo_op stat) and a fused attention
# (named by its annotation) on the compute stream, a fusion and a copy on a second
# stream, and the "XLA Ops" line that repeats them coarser.
_GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 1
    name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 6000000000 stats { metadata_id: 1 str_value: "cublas-gemm.3" } }
    events { metadata_id: 2 offset_ps: 7000000000 duration_ps: 2000000000 stats { metadata_id: 2 str_value: "jit_step::custom-call.7" } }
    events { metadata_id: 1 offset_ps: 10000000000 duration_ps: 6000000000 stats { metadata_id: 1 str_value: "cublas-gemm.3" } }
    events { metadata_id: 2 offset_ps: 17000000000 duration_ps: 2000000000 stats { metadata_id: 2 str_value: "jit_step::custom-call.7" } }
  }
  lines {
    id: 2
    name: "Stream #14(Compute)"
    events { metadata_id: 3 offset_ps: 0 duration_ps: 1000000000 stats { metadata_id: 1 str_value: "loop_add_fusion.2" } }
    events { metadata_id: 4 offset_ps: 1000000000 duration_ps: 1000000000 }
  }
  lines {
    id: 3
    name: "XLA Ops"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 90000000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_bf16bf16_bf16f32" } }
  event_metadata { key: 2 value { id: 2 name: "cudnn_generated_fort_native_sdpa_sm90" } }
  event_metadata { key: 3 value { id: 3 name: "loop_add_fusion" } }
  event_metadata { key: 4 value { id: 4 name: "copy_transpose_kernel" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
  stat_metadata { key: 2 value { id: 2 name: "annotation" } }
}
"""


def test_summary_splits_device_time_by_op_and_kind():
  profile = jax.profiler.ProfileData.from_text_proto(_GPU_TRACE)
  summary = profile_step.summarize(profile, steps=2, step_seconds=0.02, top=3)
  assert summary["wall_ms_per_step"] == pytest.approx(20.0)
  assert summary["device_ms_per_step"] == pytest.approx(9.0)  # 18 ms of kernels, 2 steps
  assert summary["by_kind_ms_per_step"] == pytest.approx(
      {"matmul": 6.0, "attention": 2.0, "fusion": 0.5, "copy": 0.5})
  assert list(summary["by_kind_ms_per_step"]) == ["matmul", "attention", "fusion", "copy"]
  ops = summary["top_ops"]
  assert [o["op"] for o in ops] == ["cublas-gemm.3", "custom-call.7", "loop_add_fusion.2"]
  assert ops[1]["kernel"] == "cudnn_generated_fort_native_sdpa_sm90"
  assert ops[0]["share"] == pytest.approx(12 / 18)
  text = profile_step.format_summary(summary)
  assert "cublas-gemm.3" in text and "matmul" in text


@pytest.mark.parametrize("names,kind", [
    (("fusion.12", "triton_gemm_dot_3"), "matmul"),
    (("custom-call.4", "cudnn_generated_fort_native_sdpa"), "attention"),
    (("all-reduce.1", "ncclDevKernel_AllReduce"), "collective"),
    (("transpose.9", "transpose_kernel"), "copy"),
    (("input_reduce_fusion.1", "input_reduce_fusion"), "fusion"),
    (("rng-bit-generator", "philox"), "other"),
])
def test_kind_of(names, kind):
  assert profile_step.kind_of(*names) == kind


@pytest.mark.parametrize("stats,op", [
    ({"hlo_op": "fusion.4", "annotation": "fusion.9"}, "fusion.4"),
    ({"annotation": "jit_step::fusion.7:#hlo_op=fusion.7,hlo_module=jit_step#"}, "fusion.7"),
    ({"annotation": "jit_step::custom-call.2"}, "custom-call.2"),
    ({"correlation_id": 12}, "loop_add_fusion"),
])
def test_op_name_prefers_the_hlo_op_then_the_annotation(stats, op):
  assert profile_step.op_name(stats, "loop_add_fusion") == op


def test_traced_run_writes_the_trace_and_summary(tmp_path):
  config = audio_config.get_config("demo")
  config.model.depth = config.model.decoder.depth = 1
  summary = profile_step.profile_phase(config, "encoder", 16, str(tmp_path), steps=2,
                                       warmup=1, top=5)
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
  written = json.loads((tmp_path / "profile_summary.json").read_text())
  assert written["wall_ms_per_step"] == summary["wall_ms_per_step"] > 0
  assert (written["phase"], written["batch"], written["steps"]) == ("encoder", 16, 2)
  assert written["top_ops"] == []  # the CPU backend traces no device plane


# Kernels inside an XLA:GPU command buffer: each names the buffer as its hlo_op.
_COMMAND_BUFFER_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 1
    name: "Stream #14(Memset,Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 3000000000 stats { metadata_id: 1 str_value: "command_buffer_358" } }
    events { metadata_id: 2 offset_ps: 3000000000 duration_ps: 5000000000 stats { metadata_id: 1 str_value: "command_buffer_358" } }
    events { metadata_id: 3 offset_ps: 8000000000 duration_ps: 1000000000 stats { metadata_id: 1 str_value: "command_buffer_358" } }
    events { metadata_id: 4 offset_ps: 9000000000 duration_ps: 1000000000 stats { metadata_id: 1 str_value: "command_buffer_12" } }
  }
  event_metadata { key: 1 value { id: 1 name: "loop_multiply_fusion_11" } }
  event_metadata { key: 2 value { id: 2 name: "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT" } }
  event_metadata { key: 3 value { id: 3 name: "input_add_reduce_fusion_52" } }
  event_metadata { key: 4 value { id: 4 name: "loop_multiply_fusion_12" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""
_HLO = """
ENTRY %main {
  %loop_multiply_fusion.11 = bf16[4,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_multiply.11, metadata={op_name="jit(train_step)/jvp(Decoder)/decoder_blocks_0/mlp/mul" stack_frame_id=3}
  ROOT %loop_multiply_fusion.12 = bf16[4,8]{1,0} fusion(%q), kind=kLoop, calls=%fused_multiply.12, metadata={op_name="jit(train_step)/jvp(Decoder)/decoder_blocks_15/mlp/mul"}
  %input_add_reduce_fusion.52 = bf16[8]{0} fusion(%r), kind=kInput, metadata={op_name="jit(train_step)/transpose(jvp(Decoder))/decoder_blocks_15/mlp/fc1/reduce_sum"}
}
"""


def test_kernels_in_command_buffers_are_told_apart_and_traced_to_jax_ops():
  profile = jax.profiler.ProfileData.from_text_proto(_COMMAND_BUFFER_TRACE)
  sources = profile_step.hlo_sources(_HLO)
  assert sources["loop_multiply_fusion_12"] == "jvp(Decoder)/decoder_blocks_*/mlp/mul"
  summary = profile_step.summarize(profile, steps=1, step_seconds=0.01, top=5, sources=sources)
  assert [o["op"] for o in summary["top_ops"]] == [
      "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "loop_multiply_fusion_11",
      "input_add_reduce_fusion_52", "loop_multiply_fusion_12"]
  assert summary["by_kind_ms_per_step"] == pytest.approx({"matmul": 5.0, "fusion": 5.0})
  assert [(o["source"], o["ms_per_step"]) for o in summary["top_sources"]] == [
      ("(matmul, no source)", pytest.approx(5.0)),
      ("jvp(Decoder)/decoder_blocks_*/mlp/mul", pytest.approx(4.0)),
      ("transpose(jvp(Decoder))/decoder_blocks_*/mlp/fc1/reduce_sum", pytest.approx(1.0))]
  assert "top JAX ops" in profile_step.format_summary(summary)
