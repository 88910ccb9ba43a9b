"""Two CPU processes as one job (`--distributed`): train, preempt together, resume."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bridle_jax.data import demo

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The demo corpus with 39 training clips: host shards of 20 and 19 fall out of step."""
  corpus = demo.write_demo_corpus(tmp_path_factory.mktemp("corpus"), clips_per_class=4,
                                  eval_clips_per_class=1)
  with open(corpus["train"]) as f:
    manifest = json.load(f)
  manifest["data"] = manifest["data"][:39]
  odd = os.path.join(os.path.dirname(corpus["train"]), "train_39.json")
  with open(odd, "w") as f:
    json.dump(manifest, f)
  return dict(corpus, train=odd)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(corpus, workdir) -> list[subprocess.Popen]:
  """Both processes of a 2 x 2-device job running the encoder phase, reusing codes."""
  port = _free_port()
  env = cpu_env.subprocess_env(2)
  return [subprocess.Popen(
      [sys.executable, "-m", "bridle_jax.main", "--config=configs/audio.py:demo",
       f"--workdir={workdir}", "--distributed", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}", "--config.data.demo_dir=",
       f"--config.data.manifest={corpus['train']}",
       f"--config.data.label_csv={corpus['label_csv']}", "--config.rounds=('encoder',)",
       f"--config.encoder_phase.steps={STEPS}", "--config.checkpoint_every=4",
       # Each process stores the codes of its own rows of the global batch.
       "--config.encoder_phase.reuse_codes=True", "--config.data.roll_mag_aug=False"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _finish(processes) -> list[tuple[int, str]]:
  """(exit code, stderr) of each process once it has ended."""
  errors = [p.communicate(timeout=300)[1] for p in processes]
  return [(p.returncode, err) for p, err in zip(processes, errors)]


def test_two_processes_preempt_at_one_step_and_resume(corpus, tmp_path):
  processes = _launch(corpus, tmp_path)
  first_save = tmp_path / "checkpoints" / "p1_encoder" / "4"
  deadline = time.time() + 240
  while not first_save.exists():
    assert all(p.poll() is None for p in processes), _finish(processes)
    assert time.time() < deadline, "no checkpoint within 240 s"
    time.sleep(0.05)
  for p in processes:
    p.send_signal(signal.SIGTERM)
  results = _finish(processes)
  assert [code for code, _ in results] == [143, 143], results
  # jax's preemption sync point makes both stop at the same step.
  stops = {err.split("preempted at step ")[1].split("/")[0] for _, err in results}
  assert len(stops) == 1, results
  assert int(stops.pop()) < STEPS

  results = _finish(_launch(corpus, tmp_path))
  assert [code for code, _ in results] == [0, 0], results
  assert all("resumed at step" in err for _, err in results)
  assert "process 1 of 2: 2 local devices of 4" in results[1][1]
  summary = json.loads((tmp_path / "summary.json").read_text())["phases"]["p1_encoder"]
  assert summary["steps"] == STEPS and summary["batches_with_reused_codes"] > 0

  # Every process loads the finished phase (what fast probes, embeddings and exports do).
  port = _free_port()
  load = ("import sys, jax, numpy as np; from bridle_jax import workdir; "
          f"jax.distributed.initialize('localhost:{port}', 2, int(sys.argv[1])); "
          f"_, _, tree = workdir.load_pretrained({str(tmp_path)!r}); "
          "print(sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(tree)))")
  env = cpu_env.subprocess_env(2)
  loaders = [subprocess.Popen([sys.executable, "-c", load, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in loaders]
  assert [p.returncode for p in loaders] == [0, 0], outputs
  totals = [out.splitlines()[-1] for out, _ in outputs]  # after the collectives' chatter
  assert totals[0] == totals[1] and float(totals[0]) > 0
