"""The commands researchers type: one short door per verb, `python -m lmobjective.<verb>`, beside its
console script in pyproject.toml, both opening the same `cli`.

Every command runs in a subprocess from another directory (tmp_path), as from a researcher's shell;
the environment is inherited as it is. Each `python -m` costs 0.1-3 s (JAX's import), so --help runs
once per verb, all six at once, and each verb does one real call.
"""

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# verb -> (the module `python -m lmobjective.<verb>` runs, its console script, a line of --help that
# only this verb prints: one of its own flags)
VERBS = {
    "train": ("lmobjective.train", "lmobjective-train", "  --cpu_devices: "),
    "evaluate": ("lmobjective.evaluate", "lmobjective-evaluate", "  --pairs_file: "),
    "export": ("lmobjective.export", "lmobjective-export", "  --max_shard_mb: "),
    "diagnose": ("lmobjective.diagnose", "lmobjective-diagnose", "  --workdir: Run directory holding metrics.jsonl."),
    "sweep": ("lmobjective.sweep.__main__", "lmobjective-sweep", "  --[no]results_only: "),
    "mixture_regression": ("lmobjective.mixture_regression", "lmobjective-mixture-regression", "  --min_weight: "),
}


def start(verb, *args, cwd):
  return subprocess.Popen([sys.executable, "-m", f"lmobjective.{verb}", *map(str, args)], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def command(verb, *args, cwd):
  return finish(start(verb, *args, cwd=cwd))


def one_error_line(r):
  assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
  cwd = tmp_path_factory.mktemp("elsewhere")
  procs = {verb: start(verb, "--help", cwd=cwd) for verb in VERBS}  # all at once: the imports overlap
  return {verb: finish(p) for verb, p in procs.items()}


@pytest.mark.parametrize("verb", VERBS)
def test_help_names_the_command_and_its_own_flags(helps, verb):
  r = helps[verb]
  assert r.returncode == 0, (r.stdout, r.stderr)
  assert f"python -m lmobjective.{verb} " in r.stdout  # the door's docstring: the short command
  assert VERBS[verb][2] in r.stdout, r.stdout
  others = [v for v in VERBS if v != verb and VERBS[v][2] in r.stdout]
  assert not others, f"{verb} --help lists the flags of {others}"


def test_every_console_script_opens_the_same_cli_as_its_door():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert sorted(scripts) == sorted(script for _, script, _ in VERBS.values())
  for door, script, _ in VERBS.values():
    module, _, name = scripts[script].partition(":")
    target = importlib.import_module(module)  # importing a door (below) must not run its command
    assert target.__file__.startswith(os.path.join(ROOT, "lmobjective")), target.__file__  # this tree
    assert getattr(target, name) is importlib.import_module(door).cli, script


@pytest.mark.parametrize("verb", [v for v in VERBS if v != "train"])  # train.py is the CLI itself
def test_a_door_is_a_docstring_an_import_and_a_main_guard(verb):
  door = VERBS[verb][0]
  with open(os.path.join(ROOT, *door.split(".")) + ".py") as f:
    tree = ast.parse(f.read())
  doc, imp, guard = tree.body  # nothing else runs on import
  assert ast.get_docstring(tree).startswith(f"`python -m lmobjective.{verb} ")
  assert isinstance(imp, ast.ImportFrom) and [a.name for a in imp.names] == ["cli"] and not imp.names[0].asname
  assert ast.unparse(guard) == "if __name__ == '__main__':\n    cli()"


def test_train_names_an_unknown_config_key(tmp_path):
  r = command("train", f"--workdir={tmp_path / 'run'}", "--config.train.nosuchkey=1", cwd=tmp_path)
  assert one_error_line(r) == "error: unknown config key: config.train.nosuchkey (not declared in the config file)"
  assert not os.path.exists(tmp_path / "run")


def test_evaluate_without_checkpoints(tmp_path):
  r = command("evaluate", "--workdir=nowhere", "--source=code", cwd=tmp_path)
  assert one_error_line(r) == f"error: no checkpoints in {tmp_path / 'nowhere' / 'checkpoints'}"


def test_export_refuses_before_writing(tmp_path):
  r = command("export", "--workdir=nowhere", "--out=hf", cwd=tmp_path)
  assert one_error_line(r) == f"error: no checkpoints in {tmp_path / 'nowhere' / 'checkpoints'}"
  (tmp_path / "hf").mkdir()
  r = command("export", "--workdir=nowhere", "--out=hf", cwd=tmp_path)
  assert one_error_line(r) == "error: --out=hf: exists; export writes a new directory"


# A 2-step tiny run's metrics.jsonl (configs/tiny.py, vocab 512), trimmed to what diagnose reads.
TINY_RUN = [{"step": 0, "val_loss": 6.151139259338379},
            {"step": 1, "train_loss": 6.219205379486084, "grad_norm": 0.93, "param_norm": 19.13, "tokens_seen": 256},
            {"step": 2, "train_loss": 6.203991413116455, "grad_norm": 1.05, "param_norm": 19.19, "tokens_seen": 512},
            {"step": 2, "val_loss": 6.048245429992676}]


def test_diagnose_reads_a_run(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"model": {"vocab_size": 512}}))
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_RUN))
  r = command("diagnose", "--workdir=run", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  first, last = TINY_RUN[0]["val_loss"], TINY_RUN[-1]["val_loss"]
  assert r.stdout.splitlines()[:2] == [
      "diagnostics: 1 finding(s)",
      f"  not_learning (steps 0-2): val_loss went from {first:.3f} to {last:.3f}, still near ln V = ln 512 = "
      f"6.238 (fell by {first - last:.3f} < 5% of it). Likely causes: learning rate far too low (or zero), a "
      "schedule that never warms up, frozen params, or labels not aligned with inputs."]
  assert [f["kind"] for f in json.loads((run / "diagnostics.json").read_text())] == ["not_learning"]


# val_loss/<source> = LAW[source] . (normalised weights of code, markov, prose)
LAW = {"code": [2.0, 4.0, 3.5], "markov": [3.0, 0.7, 2.8], "prose": [5.0, 3.0, 1.5]}


def test_sweep_plans_and_mixture_regression_fits_it(tmp_path):
  spec = os.path.join(ROOT, "experiments", "mixture_ablation.py") + ":quick"
  r = command("sweep", f"--sweep={spec}", "--workdir=mix", "--results_only", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  plan = json.loads((tmp_path / "mix" / "sweep.json").read_text())
  assert len(plan["runs"]) == 8 and r.stdout.count("| not started |") == 8, r.stdout
  for name, overrides in plan["runs"].items():  # each run finished, its losses on a known linear law
    w = {s: float(overrides[f"data.sources.{s}.weight"]) for s in LAW}
    w = {s: v / sum(w.values()) for s, v in w.items()}
    losses = {s: sum(b * w[t] for b, t in zip(LAW[s], sorted(LAW))) for s in LAW}
    run = tmp_path / "mix" / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"data": {"context_length": 64, "sources": {s: {"weight": w[s]} for s in LAW}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 200, "val_loss": sum(losses.values()) / 3,
                                                   **{f"val_loss/{s}": v for s, v in losses.items()}}) + "\n")
    (run / "diagnostics.json").write_text("[]")
    (run / "DONE.json").write_text(json.dumps({"wall_s": 1.0}))
  r = command("mixture_regression", "--workdir=mix", "--law=linear", cwd=tmp_path)
  assert r.returncode == 0, r.stderr
  assert "law: linear (L_i = sum_j b_ij w_j), fitted on 8 runs" in r.stdout
  for s in LAW:
    assert f"{s:>10}  1.0000" in r.stdout, r.stdout  # R^2 of an exact law
  fit = json.loads((tmp_path / "mix" / "mixture_fit.json").read_text())
  assert fit["sources"] == sorted(LAW) and sorted(fit["runs"]) == sorted(plan["runs"])
  for s, b in LAW.items():
    assert fit["params"][s]["b"] == pytest.approx(b, rel=1e-6)


def test_the_suites_longest_first_files_exist_and_run_sh_keeps_their_order():
  """tests/conftest.py orders the longest files first; a renamed file would silently fall to the end,
  and xdist's own reordering (most tests first) would undo the order unless tests/run.sh turns it off."""
  spec = importlib.util.spec_from_file_location("suite_conftest", os.path.join(ROOT, "tests", "conftest.py"))
  conftest = importlib.util.module_from_spec(spec)  # by path: tests/data/conftest.py is also 'conftest'
  spec.loader.exec_module(conftest)
  LONGEST_FIRST = conftest.LONGEST_FIRST
  assert [p for p in LONGEST_FIRST if not os.path.isfile(os.path.join(ROOT, p))] == []
  assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
  assert "--dist loadfile --no-loadscope-reorder" in open(os.path.join(ROOT, "tests", "run.sh")).read()
