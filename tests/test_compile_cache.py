"""The persistent compilation cache: a restarted run reloads its compiled programs from
`compile_cache_dir`; a directory the process names itself wins; bad paths name the field."""
import json
import os
import subprocess
import sys

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# For each argument WORKDIR::CACHE_DIR in turn: prepares the demo config with that
# workdir and compile_cache_dir, then compiles the same program afresh (as a new Trainer).
_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from bridle_jax import prepare
from configs import audio
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
report = []
for run in sys.argv[1:]:
  workdir, cache_dir = run.split("::")
  config = audio.get_config("demo")
  config.data.demo_dir, config.data.manifest, config.data.label_csv = "", "a.json", "b.csv"
  config.compile_cache_dir = cache_dir
  prepare.prepare(config, workdir)
  jax.clear_caches()
  events.clear()
  step = jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T)
  step(jnp.ones((128, 128)), jnp.ones((8, 128))).block_until_ready()
  report.append({"hits": events.count("/jax/compilation_cache/cache_hits"),
                 "in_use": jax.config.jax_compilation_cache_dir,
                 "config": config.compile_cache_dir})
print(json.dumps(report))
"""


def _run(*runs, process_cache=None):
  """Runs the script on (workdir, compile_cache_dir) pairs in one fresh process."""
  env = cpu_env.subprocess_env(1)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if process_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = str(process_cache)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  args = [f"{workdir}::{cache}" for workdir, cache in runs]
  return subprocess.run([sys.executable, "-c", _SCRIPT, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def _report(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _entries(directory):
  return sorted(f for f in os.listdir(directory) if f.endswith("-cache"))


def test_a_restarted_run_loads_its_programs_from_the_workdir(tmp_path):
  workdir = tmp_path / "run"
  cache = str(workdir / "compile_cache")
  first, = _report(_run((workdir, "{workdir}/compile_cache")))
  assert first == {"hits": 0, "in_use": cache, "config": cache}
  entries = _entries(cache)
  assert entries
  again, = _report(_run((workdir, "{workdir}/compile_cache")))
  assert again["hits"] >= 1 and again["in_use"] == cache
  assert _entries(cache) == entries  # read, not written again


def test_each_run_in_a_process_uses_its_own_cache_and_empty_turns_it_off(tmp_path):
  a, b, off = _report(_run((tmp_path / "a", "{workdir}/xla"), (tmp_path / "b", "{workdir}/xla"),
                           (tmp_path / "c", "")))
  assert (a["in_use"], b["in_use"]) == (str(tmp_path / "a" / "xla"), str(tmp_path / "b" / "xla"))
  assert _entries(tmp_path / "a" / "xla") and _entries(tmp_path / "b" / "xla")
  assert off == {"hits": 0, "in_use": None, "config": ""}
  assert not (tmp_path / "c").exists()


def test_a_cache_the_process_names_wins_over_the_config(tmp_path):
  mine = tmp_path / "shared_cache"
  run, = _report(_run((tmp_path / "run", "{workdir}/compile_cache"), process_cache=mine))
  assert run["in_use"] == str(mine) and _entries(mine)
  assert not (tmp_path / "run" / "compile_cache").exists()


def test_a_cache_dir_that_cannot_be_made_names_the_field(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  result = _run((tmp_path / "run", str(tmp_path / "file" / "cache")))
  assert result.returncode != 0
  assert "compile_cache_dir: cannot create" in result.stderr
  assert str(tmp_path / "file" / "cache") in result.stderr
