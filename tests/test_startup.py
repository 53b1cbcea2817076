"""A run's start-up, the seconds before its first step (a large share of a short run's time to a loss):
the train step compiles on a background thread from abstract inputs while the state is initialised,
and the executable that runs is that one; tensorboardX's writer does not import torch; the training
CLI imports no matplotlib before its first figure."""

import concurrent.futures
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from lmobjective import sharding
from lmobjective.run import experiment
from _tiny import ROOT, tiny_config


def _pending(program) -> int:
  return sum(isinstance(v, concurrent.futures.Future) for v in program._compiled.values())


@pytest.mark.parametrize("overrides", [{}, pytest.param({"train.grad_accum_steps": 2, "model.scan_layers": True}, marks=pytest.mark.slow)])
def test_the_train_step_compiled_ahead_is_the_one_that_runs(tmp_path, overrides):
  exp = experiment.build(tiny_config(tmp_path / "cache", **overrides), str(tmp_path / "run"))
  assert _pending(exp.train_fn) == 0
  abstract = sharding.abstract_state(exp.init_fn.eval_shape(jax.random.key(0)), exp.state_sharding)
  experiment.compile_train_step_ahead(exp, abstract)  # as restore_or_init does
  assert _pending(exp.train_fn) == 1
  state = exp.init_fn(jax.random.key(0))
  batches = exp.pipeline.train_iterator()
  for _ in range(2):
    state, metrics = exp.train_fn(state, experiment.device_batch(exp, next(batches)))
  assert float(metrics["loss"]) > 0
  # a real batch or state whose signature differed from the abstract one would have compiled a second program
  assert _pending(exp.train_fn) == 0 and len(exp.train_fn.executables) == 1


def test_an_error_of_the_background_compile_is_raised_by_the_call():
  def bad(x):
    raise ValueError("traced a bad program")

  program = sharding.Program(bad, sharding.single_device_mesh())
  program.compile_ahead(jax.ShapeDtypeStruct((2,), "float32"))
  with pytest.raises(ValueError, match="traced a bad program"):
    program(jax.numpy.zeros(2))


def test_tensorboard_writer_does_not_import_torch_and_leaves_it_importable(tmp_path):
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("import os\nopen(os.environ['MARK'], 'a').write('imported\\n')\n")
  script = textwrap.dedent(f"""
      import sys
      from lmobjective.run import metrics_log
      w = metrics_log.MetricsWriter({str(tmp_path / 'run')!r})
      w.write({{"step": 1, "train_loss": 2.0}}); w.close()
      assert "torch" not in sys.modules
      import torch  # still importable after the writer
      print("ok")
  """)
  mark = tmp_path / "mark"
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{ROOT}", MARK=str(mark)))
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
  assert mark.read_text() == "imported\n"  # once: by the script's own import, never by tensorboardX
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_training_cli_imports_no_matplotlib_before_its_first_figure():
  r = subprocess.run([sys.executable, "-c", "import sys, lmobjective.train; print('matplotlib' in sys.modules)"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
