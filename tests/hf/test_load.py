"""Importing Hugging Face checkpoints: logits, the masked loss and greedy tokens equal transformers'
(fixtures from tests/fixtures/make_hf_refs.py); the mutations import bugs make move the logits;
placement on 8 devices equals one device's and reads only each device's slice; bad input is one line."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hf import MODELS, fixture_dir, hf_copy, imported, refs

from lmobjective.hf.configs import HFError

HERE = os.path.dirname(os.path.abspath(__file__))


def _logits(model, params, ids):
  return np.asarray(model.apply({"params": params}, jnp.asarray(ids)))


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_transformers(name):
  """Within 1e-4 over 96 positions (float32; sharp attention: the fixtures' weights have std 0.5)."""
  model, params, _ = imported(name)
  r = refs(name)
  got = _logits(model, params, r["ids"])[:, r["logits_positions"]]
  assert r["ids"].shape[1] == 96 and r["logits_positions"].max() >= 90  # late positions: RoPE bugs grow with them
  np.testing.assert_allclose(got, r["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_masked_loss_equals_transformers_labels_loss(name):
  """`next_token.score` with a loss mask where transformers' labels are -100 gives its `labels=` loss
  (mean over the scored targets) within 1e-5 relative."""
  from lmobjective.objectives import next_token
  model, params, _ = imported(name)
  r = refs(name)
  ids, labels = r["ids"], r["labels"]
  T = ids.shape[1] - 1
  batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
           "loss_mask": jnp.asarray(labels[:, 1:] != -100), "positions": jnp.arange(T)[None],
           "segment_ids": jnp.ones((1, T), jnp.int32)}
  losses = next_token.score(model, params, batch)
  loss = float(losses.nll.sum() / losses.valid.sum())
  assert int(losses.valid.sum()) == int((labels[:, 1:] != -100).sum()) > 50
  np.testing.assert_allclose(loss, float(r["loss"]), rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_equal_transformers_generate(name):
  """20 greedy tokens through the KV-cached sampler, EOS stopping off, token for token."""
  from lmobjective import sampling, sharding
  from lmobjective.objectives.distribution import SamplingConfig
  model, params, _ = imported(name)
  r = refs(name)
  assert float(r["greedy_margin"]) > 1e-2  # the fixture was chosen so that rounding cannot flip a token
  sampler = sampling.Sampler(model, sharding.single_device_mesh())
  samples, _, _ = sampler(params, [r["prompt"][0].tolist()], SamplingConfig(max_new_tokens=20, temperature=0.0))
  np.testing.assert_array_equal(np.asarray(samples.tokens), r["greedy"])


# ---- the bugs others shipped move the logits -------------------------------------------------------

def _moved(name, params=None, **cfg_changes) -> float:
  from lmobjective.model import Transformer
  model, good, _ = imported(name)
  if cfg_changes:
    model = Transformer(dataclasses.replace(model.cfg, **cfg_changes))
  r = refs(name)
  return float(np.abs(_logits(model, params or good, r["ids"])[:, r["logits_positions"]] - r["logits"]).max())


def _replace(params, path, fn):
  out = jax.tree.map(lambda x: x, params)
  node = out
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = fn(node[path[-1]])
  return out


def _interleave(kernel):  # Meta's interleaved RoPE layout: new[2i] = old[i], new[2i+1] = old[i + H/2]
  H = kernel.shape[-1]
  order = np.stack([np.arange(H // 2), np.arange(H // 2) + H // 2], axis=1).reshape(-1)
  return kernel[..., order]


def test_import_mutations_move_the_logits():
  """Each bug the anchors' issue trackers record, applied to a correct import, moves the logits by
  more than 1e-3: the equivalence tests above would catch it."""
  _, llama, _ = imported("llama")
  permuted = llama
  for i in range(2):
    for which in ("query", "key"):
      permuted = _replace(permuted, (f"block_{i}", "attn", which, "kernel"), _interleave)
  assert _moved("llama", permuted) > 1e-3, "the wrong RoPE permutation"
  _, qwen2, _ = imported("qwen2")
  assert _moved("qwen2", _replace(qwen2, ("block_0", "attn", "query", "bias"), jnp.zeros_like)) > 1e-3, "no q bias"
  assert _moved("llama", norm_eps=1e-6) > 1e-3, "RMSNorm eps 1e-6 instead of config.json's 1e-5"
  assert _moved("llama", rope_theta=1e4) > 1e-3, "RoPE theta 1e4 instead of 5e5"
  # query head h with kv head h % K instead of h // (N/K): the heads' order changed in q and o alike
  order = np.array([0, 2, 1, 3])
  regrouped = llama
  for i in range(2):
    regrouped = _replace(regrouped, (f"block_{i}", "attn", "query", "kernel"), lambda k: k[:, order])
    regrouped = _replace(regrouped, (f"block_{i}", "attn", "out", "kernel"), lambda k: k[order])
  assert _moved("llama", regrouped) > 1e-3, "the wrong GQA grouping"
  assert _moved("llama") < 1e-4  # and the import itself does not


def test_mistral_is_llama_without_a_sliding_window(tmp_path):
  """A Mistral checkpoint has Llama's keys and math when its window never acts: the llama fixture
  relabelled `model_type: mistral` gives transformers' llama logits."""
  from lmobjective.hf import load
  path = hf_copy(tmp_path, "llama")
  _edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
  model, params, hf = load.import_model(path)
  r = refs("llama")
  assert hf["model_type"] == "mistral"
  np.testing.assert_allclose(_logits(model, params, r["ids"])[:, r["logits_positions"]], r["logits"], atol=1e-4, rtol=0)


def test_both_rope_forms_of_config_json(tmp_path):
  """transformers 5 writes `rope_parameters`; older files a top-level `rope_theta`: the same model."""
  from lmobjective.hf import configs
  path = hf_copy(tmp_path, "llama")
  hf = configs.read(path)
  assert "rope_parameters" in hf
  old = {k: v for k, v in hf.items() if k != "rope_parameters"}
  old["rope_theta"] = hf["rope_parameters"]["rope_theta"]
  assert configs.model_keys(old, "config.json") == configs.model_keys(hf, "config.json")
  assert configs.model_keys(hf, "config.json")["rope_theta"] == 5e5


# ---- bad input: one line naming the file and field ------------------------------------------------

def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  hf = json.load(open(file))
  hf.update(changes)
  json.dump(hf, open(file, "w"))


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type='llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gemma"}, "model_type='gemma'"),
])
def test_unsupported_fields_are_refused_in_one_line(tmp_path, changes, message):
  from lmobjective.hf import load
  path = hf_copy(tmp_path, "llama")
  _edit_config(path, **changes)
  with pytest.raises(HFError) as e:
    load.import_model(path)
  assert message in str(e.value) and "config.json" in str(e.value) and "\n" not in str(e.value)


def test_an_active_sliding_window_is_refused(tmp_path):
  from lmobjective.hf import configs
  hf = dict(configs.read(fixture_dir("llama")), model_type="mistral", sliding_window=64)
  with pytest.raises(HFError, match="sliding_window=64: shorter than the context"):
    configs.model_keys(hf, "config.json", context_length=96)
  assert configs.model_keys(hf, "config.json", context_length=64)["position"] == "rope"  # never acts
  qwen = dict(configs.read(fixture_dir("qwen2")), use_sliding_window=True, sliding_window=16)
  with pytest.raises(HFError, match="use_sliding_window=True"):
    configs.model_keys(qwen, "config.json", context_length=96)


def test_gpt2_variants_are_refused():
  from lmobjective.hf import configs
  hf = configs.read(fixture_dir("gpt2"))
  for field, value in (("activation_function", "relu"), ("scale_attn_by_inverse_layer_idx", True),
                       ("reorder_and_upcast_attn", True)):
    with pytest.raises(HFError, match=f"{field}={value!r}"):
      configs.model_keys(dict(hf, **{field: value}), "config.json")


def test_missing_files_keys_and_shapes_are_refused(tmp_path):
  from safetensors.numpy import load_file, save_file

  from lmobjective.hf import load
  with pytest.raises(HFError, match="no config.json"):
    load.import_model(str(tmp_path))
  path = hf_copy(tmp_path, "llama")
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  key = "model.layers.1.self_attn.k_proj.weight"
  save_file({k: v for k, v in tensors.items() if k != key}, file, metadata={"format": "pt"})
  with pytest.raises(HFError, match=f"no tensor '{key}'"):
    load.import_model(path)
  save_file({**tensors, key: tensors[key][:8]}, file, metadata={"format": "pt"})
  with pytest.raises(HFError, match=r"k_proj.weight' has shape \[8, 32\]; config.json's model needs \[16, 32\]"):
    load.import_model(path)
  save_file({**tensors, "v_head.weight": tensors[key]}, file, metadata={"format": "pt"})
  with pytest.raises(HFError, match="'v_head.weight' .* is not a parameter"):
    load.import_model(path)
  os.remove(file)
  with pytest.raises(HFError, match="neither model.safetensors nor model.safetensors.index.json"):
    load.import_model(path)


# ---- placement on a mesh -------------------------------------------------------------------------

def test_sharded_placement_on_8_devices_equals_one_device():
  """The sharded fixture (llama_headdim: two safetensors files) on a (2,2,2) mesh: every param equals the
  one-device import bit for bit and carries the sharding the model's logical axes give; every callback
  read exactly the slice its device keeps (a quarter of a tensor split over fsdp x tensor, half of one
  split over one of them), never a whole tensor that is split."""
  from _tiny import run_on_8_devices
  got = run_on_8_devices(os.path.abspath(__file__), "llama_headdim")
  assert got["devices"] == 8
  assert got["equal"], got["unequal"]
  assert got["sharded_as_declared"], got["wrong_sharding"]
  assert got["reads_are_own_shards"], got["bad_reads"]
  assert got["reads"] == 8 * got["keys"]  # one per device and tensor
  assert got["read_fractions_of_split_tensors"] == [0.25, 0.5] and got["split_keys"] >= 10
  # the query kernel [D=32, N=4, H=16] splits D over fsdp and its heads over tensor
  assert got["query_shard_shape"] == [16, 2, 16]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_each_slice_map_gives_to_ours_of_the_whole_tensor_sliced(name):
  """A one-tensor group's `slice_map` (read a block of the HF tensor, transform it in NumPy) against its
  `to_ours` of the whole tensor, on every block of every split into halves of one or two dimensions
  (the vocabulary padded past the file's rows, heads split, transposes); a split that is not a block of
  the file (an inner dimension of a reshaped one: H of [N, H] from N·H) gives None, and the import falls
  back to placing the tensor as it is."""
  import itertools

  from lmobjective.hf import keymap, load
  _, params, hf = imported(name)
  cfg = load.model_config(hf, "config.json", tokenizer_vocab=None)
  cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 32)  # 32 padding rows past the file's
  groups = load.groups_for(hf, cfg, hf["vocab_size"])
  rng = np.random.default_rng(0)
  checked = blocks = 0
  for g, layer, _ in keymap.expand(groups, cfg.num_layers):
    if g.slice_map is None or layer not in (None, 0):
      continue
    ours_shape = load._get(params, keymap.layer_path(cfg, 0, g.ours[0]) if layer is not None else g.ours[0]).shape
    if g.ours[0] in (("token_embed", "embedding"),):
      ours_shape = (cfg.vocab_size,) + ours_shape[1:]
    elif g.ours[0] == ("lm_head", "kernel"):
      ours_shape = ours_shape[:1] + (cfg.vocab_size,)
    (hf_shape,) = [w.shape for w in jax.eval_shape(g.to_hf, jax.ShapeDtypeStruct(ours_shape, np.float32))]
    w = rng.standard_normal(hf_shape).astype(np.float32)
    (want,) = [np.asarray(x) for x in g.to_ours(w)]
    assert want.shape == ours_shape
    for dims in itertools.chain.from_iterable(itertools.combinations(range(len(ours_shape)), k) for k in (0, 1, 2)):
      if any(ours_shape[d] % 2 for d in dims):
        continue
      for halves in itertools.product((0, 1), repeat=len(dims)):
        r = [(0, n) for n in ours_shape]
        for d, h in zip(dims, halves):
          r[d] = (h * ours_shape[d] // 2, (h + 1) * ours_shape[d] // 2)
        plan = g.slice_map(tuple(r))
        if plan is None:
          assert dims != (0,)  # a split of the first dimension is always a block
          continue
        hf_index, fn = plan
        got = fn(w[hf_index])
        np.testing.assert_array_equal(got, want[tuple(slice(a, b) for a, b in r)])
        blocks += 1
    checked += 1
  assert checked >= 8 and blocks > 50


def _main(name: str) -> dict:
  import sys
  sys.path.insert(0, HERE)
  from lmobjective import sharding
  from lmobjective.hf import load
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  reads = []
  model, params, _ = load.import_model(fixture_dir(name), mesh=mesh, reads=reads)
  _, single, _ = load.import_model(fixture_dir(name), mesh=sharding.single_device_mesh())
  flat, one = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(single)
  unequal = [jax.tree_util.keystr(p) for (p, a), b in zip(flat, one) if not np.array_equal(np.asarray(a), np.asarray(b))]
  with sharding.activate(mesh):
    declared = sharding.param_shardings(model, mesh, (1, 1))
  wrong = [jax.tree_util.keystr(p) for (p, a), s in zip(flat, jax.tree.leaves(declared))
           if not a.sharding.is_equivalent_to(s, a.ndim)]
  from lmobjective.hf.safetensors_dir import SafetensorsDir
  ckpt = SafetensorsDir(fixture_dir(name))
  fractions, bad, split = [], [], set()
  for key, index, shard_shape in reads:
    shape = ckpt.shape(key)
    read_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
    if read_shape != tuple(shard_shape):
      bad.append((key, str(index), shard_shape))
    fraction = int(np.prod(read_shape)) / int(np.prod(shape))
    if fraction < 1:
      split.add(key)
      fractions.append(fraction)
  q = params["block_0"]["attn"]["query"]["kernel"]
  return {"devices": jax.device_count(), "equal": not unequal, "unequal": unequal[:5],
          "sharded_as_declared": not wrong, "wrong_sharding": wrong[:5], "split_keys": len(split),
          "reads_are_own_shards": not bad, "bad_reads": bad[:5], "reads": len(reads), "keys": len(ckpt.keys()),
          "read_fractions_of_split_tensors": sorted(set(fractions)),
          "query_shard_shape": list(q.addressable_shards[0].data.shape)}


if __name__ == "__main__":
  import sys
  print(json.dumps(_main(sys.argv[1])))


# ---- the notebook object and the evaluate CLI on an imported model ---------------------------------

def test_restore_hf_scores_text_as_transformers_does():
  """`lmobjective.restore_hf`: the fixture's text opens with BOS (Llama's tokenizer prepends it) and each
  token's -log p equals transformers' logits' at the stored positions."""
  import lmobjective
  r = refs("llama")
  run = lmobjective.restore_hf(fixture_dir("llama"))
  ids = r["ids"][0]
  assert ids[0] == run.tokenizer.bos_id == run.tokenizer.opener_id
  text = run.tokenizer.decode(ids[1:])
  pl = run.loss_per_position(text)
  assert pl.target_ids[:95].tolist() == ids[1:].tolist()
  logits = r["logits"][0].astype(np.float64)
  positions = r["logits_positions"][r["logits_positions"] < 95]
  theirs = [np.log(np.exp(logits[i] - logits[i].max()).sum()) + logits[i].max() - logits[i, ids[t + 1]]
            for i, t in enumerate(r["logits_positions"]) if t < 95]
  np.testing.assert_allclose(pl.nll[positions], theirs, atol=1e-4)
  assert run.generate(text[:40], max_new_tokens=5, temperature=0.0) == run.generate(text[:40], 5, 0.0)


def test_evaluate_cli_on_an_imported_model(tmp_path):
  import subprocess
  import sys

  import lmobjective
  text = str(refs("gpt2")["text"])
  (tmp_path / "t.txt").write_text(text)
  r = subprocess.run([sys.executable, "-m", "lmobjective.evaluate", f"--hf={fixture_dir('gpt2')}",
                      f"--text_file={tmp_path / 't.txt'}"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  out = dict(line.split(None, 1) for line in r.stdout.strip().splitlines())
  expected = lmobjective.restore_hf(fixture_dir("gpt2")).perplexity([text])
  assert int(out["bytes"]) == len(text.encode()) and int(out["tokens"]) == expected["num_tokens"]
  assert float(out["loss"].split()[0]) == pytest.approx(expected["loss"], rel=1e-5)
  r = subprocess.run([sys.executable, "-m", "lmobjective.evaluate", f"--hf={tmp_path}", "--text_file=t.txt"],
                     capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert r.returncode == 1 and r.stderr.strip() == f"error: hf:{tmp_path}: no config.json (a Hugging Face model " \
      "directory has config.json and model.safetensors or model.safetensors.index.json)"


def test_a_tokenizer_larger_than_the_embedding_is_refused():
  from lmobjective.hf import load
  with pytest.raises(HFError, match=r"tokenizer.json: 289 ids; .*config.json.s vocab_size is 288: the tokenizer does "
                     "not fit the model's embedding"):
    load.import_model(fixture_dir("llama"), tokenizer_vocab=289)
