"""The sampler (`sampling.py`) against references: the training forward, argmax decoding one prompt at
a time, `next_token.score` and `preference.pair_logps` on the same ids, known two-token
distributions, and the same program on 8 simulated devices.

The models use the byte tokenizer's ids (262, EOS 257, <|end|> 261) and a vocabulary padded to 272,
so every test also checks that sampler and scorer normalise over the same 262 ids.
"""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective import model as M
from lmobjective import sampling as S
from lmobjective import sharding
from lmobjective.data import sft, streams, tokenizers
from lmobjective.data.tokenized import Split
from lmobjective.objectives import next_token, preference
from _tiny import model_config, run_on_8_devices

TOK = tokenizers.ByteTokenizer()
EOS, END = TOK.eos_id, TOK.special_id("<|end|>")
# Large init_std so the logits are far from uniform and greedy decoding does not repeat one token.
MODERN = model_config(vocab_size=272, vocab_limit=TOK.vocab_size, num_layers=2, num_heads=4, num_kv_heads=2,
                      embed_dim=32, mlp_dim=64, max_len=48, init_std=0.5)  # rope + GQA
GPT2 = dataclasses.replace(MODERN, num_kv_heads=4, position="learned", norm="layernorm", norm_eps=1e-5, mlp="gelu",
                           use_bias=True, tie_embeddings=False)
SCAN = dataclasses.replace(MODERN, scan_layers=True, num_kv_heads=1)  # MQA, stacked layer cache
CONFIGS = pytest.mark.parametrize("cfg", [MODERN, pytest.param(GPT2, marks=pytest.mark.slow),
                                          pytest.param(SCAN, marks=pytest.mark.slow)], ids=["rope_gqa", "learned", "scan_mqa"])
PROMPTS = [[EOS, 104, 105], [EOS] + list(b"def main(argv):"), [EOS, 120], [EOS] + list(b"import o")]


_MODELS: dict = {}


def _init(cfg):
  if cfg not in _MODELS:
    model = M.Transformer(cfg)
    _MODELS[cfg] = model, M.nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
  return _MODELS[cfg]


_SAMPLERS: dict = {}


def _sampler(cfg, cached=True):
  """One Sampler per (model, cached) on one device, shared by the tests (compiled programs reused)."""
  if (cfg, cached) not in _SAMPLERS:
    _SAMPLERS[cfg, cached] = S.Sampler(_init(cfg)[0], sharding.single_device_mesh(), bucket=8, cached=cached)
  return _SAMPLERS[cfg, cached]


_score = jax.jit(S.score, static_argnames=("model", "cfg"))
_plain_score = jax.jit(next_token.score, static_argnames=("model",))


def _run(cfg, prompts, scfg, cached=True, **kw):
  s, prompt_BxP, lengths_B = _sampler(cfg, cached)(_init(cfg)[1], prompts, scfg, **kw)
  return S.Samples(*jax.device_get(s)), prompt_BxP, lengths_B


# ---- the cache ------------------------------------------------------------------------------------


@CONFIGS
def test_cached_logits_equal_the_full_forward(cfg):
  model, params = _init(cfg)
  B, T, P = 2, cfg.max_len, cfg.max_len - 8
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, TOK.vocab_size)
  full_BxTxV = jax.jit(model.apply)({"params": params}, tokens)
  cache = M.init_cache(cfg, B, T)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  decode = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=M.Transformer.decode))
  pieces = [decode(params, tokens[:, :P], pos[:, :P], cache)]  # prefill, then one token at a time
  cache = pieces[0][1]
  for t in range(P, T):
    logits, cache = decode(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache)
    pieces.append((logits, cache))
  cached_BxTxV = jnp.concatenate([p[0] for p in pieces], axis=1)
  live = slice(0, TOK.vocab_size)
  np.testing.assert_allclose(cached_BxTxV[..., live], full_BxTxV[..., live], atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(full_BxTxV[..., live]).max()) > 1.0  # the comparison is not between near-zero logits
  assert np.all(np.isneginf(np.asarray(cached_BxTxV[..., TOK.vocab_size:])))  # padded rows: -inf, both ways


def test_a_broken_cache_is_caught(monkeypatch):
  """The equivalence test must be able to fail: a cache that forgets the newest key breaks it."""
  original = M._update_cache

  def off_by_one(cache, k, v, valid=None):
    kk, vv, mask, new = original(cache, k, v, valid)
    slot_M = jnp.arange(mask.shape[-1])
    return kk, vv, mask & (slot_M < new["index"] - 1)[None, None, None, :] | (slot_M == 0)[None, None, None, :], new

  monkeypatch.setattr(M, "_update_cache", off_by_one)
  with pytest.raises(AssertionError):
    test_cached_logits_equal_the_full_forward(MODERN)


def test_the_decode_loop_copies_no_cache():
  """Structure: the cache's layouts ([B,K,H,M] keys, [B,K,M,H] values) are the ones the two attention
  matmuls read, so the compiled loop holds no copy of a cache-shaped array. Seen failing with the
  training layout ([B,M,K,H]): XLA:CPU transposed every layer's keys at every token, 13.5 ms/step
  against 7.2 ms at bench_sampling's batch 32."""
  import re
  from lmobjective import hlo
  _run(MODERN, PROMPTS, S.SamplingConfig(max_new_tokens=6, temperature=0.0, pad_id=TOK.pad_id))
  (text,) = [e.as_text() for e in _sampler(MODERN).program.executables
             if "s32[4,6]" in e.as_text()]  # this call's program (batch 4, 6 new tokens)
  loop = hlo.loop_lines(text)
  assert any("dynamic-update-slice(" in line for line in loop)  # the reader sees the cache writes
  copies = [line for line in loop if " copy(" in line and re.search(r"= f32\[\d+,\d+,\d+,\d+\]", line)]
  assert not copies, copies[:2]


# ---- ragged prompts, greedy, stopping ---------------------------------------------------------------


def _argmax_alone(cfg, prompt, n, stops):
  """The plainest reference: the training forward on the prompt alone, argmax, append, repeat."""
  model, params = _init(cfg)
  forward = jax.jit(lambda ids: model.apply({"params": params}, ids))
  ids, out = list(prompt), []
  for _ in range(n):
    buf = np.zeros((1, cfg.max_len), np.int32)
    buf[0, :len(ids)] = ids  # causal: the zeros after the last token change nothing before it
    out.append(int(np.argmax(np.asarray(forward(buf))[0, len(ids) - 1])))
    ids.append(out[-1])
    if out[-1] in stops:
      break
  return out


@CONFIGS
def test_greedy_on_ragged_prompts_equals_argmax_decoding_of_each_prompt_alone(cfg):
  scfg = S.SamplingConfig(max_new_tokens=14, temperature=0.0, stop_ids=(EOS,), pad_id=TOK.pad_id)
  s, _, _ = _run(cfg, PROMPTS, scfg)
  u, _, _ = _run(cfg, PROMPTS, scfg, cached=False)
  for i, p in enumerate(PROMPTS):
    want = _argmax_alone(cfg, p, 14, (EOS,))
    assert s.tokens[i][s.response_mask[i]].tolist() == want, i
  np.testing.assert_array_equal(s.tokens, u.tokens)
  assert len(np.unique(s.tokens)) > 5  # varied sequences, not one token repeated


def test_ragged_prompts_sample_what_each_prompt_samples_alone():
  """Temperature, top-p and top-k on a batch of four prompt lengths: every row draws the tokens (and
  log-probs) it draws alone with its own row key; the batch's padding and neighbours change nothing."""
  scfg = S.SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, stop_ids=(EOS,),
                          pad_id=TOK.pad_id)
  s, prompt_BxP, lengths_B = _run(MODERN, PROMPTS, scfg, seed=7, iteration=3)
  assert prompt_BxP.shape == (4, 16) and lengths_B.tolist() == [len(p) for p in PROMPTS]
  for i, p in enumerate(PROMPTS):
    alone, _, _ = _run(MODERN, [p], scfg, seed=7, iteration=3, rows=[i])
    np.testing.assert_array_equal(alone.tokens[0], s.tokens[i])
    np.testing.assert_allclose(alone.logps[0], s.logps[i], atol=1e-5)


def test_the_draws_follow_seed_iteration_and_row_not_the_batch():
  scfg = S.SamplingConfig(max_new_tokens=10, temperature=1.0, pad_id=TOK.pad_id)
  same = [PROMPTS[0]] * 4
  a, _, _ = _run(MODERN, same, scfg, seed=1, iteration=5)
  b, _, _ = _run(MODERN, same, scfg, seed=1, iteration=5)
  c, _, _ = _run(MODERN, same, scfg, seed=1, iteration=6)
  d, _, _ = _run(MODERN, same, scfg, seed=1, iteration=5, rows=[3, 2, 1, 0])
  np.testing.assert_array_equal(a.tokens, b.tokens)  # a resumed run at iteration 5 draws these again
  assert len({tuple(r) for r in a.tokens}) == 4  # one prompt, four rows, four different draws
  assert not np.array_equal(a.tokens, c.tokens)  # the next iteration draws anew
  np.testing.assert_array_equal(d.tokens, a.tokens[::-1])  # a row's draws are its row id's


def test_rows_stop_at_their_terminator_and_nothing_after_it_is_in_the_mask():
  """Greedy rows with a stop id taken from their own greedy path: each stops there (inclusive); a row
  whose stop id never comes runs to max_new_tokens and is marked truncated."""
  free = S.SamplingConfig(max_new_tokens=12, temperature=0.0, pad_id=TOK.pad_id)
  g, _, _ = _run(MODERN, PROMPTS[:2], free)
  stop = int(g.tokens[0, 4])
  first = int(np.flatnonzero(g.tokens[0] == stop)[0])
  assert stop not in g.tokens[1].tolist()  # so row 1 must run to the end
  s, _, _ = _run(MODERN, PROMPTS[:2], dataclasses.replace(free, stop_ids=(stop,)))
  assert s.response_mask[0].tolist() == [True] * (first + 1) + [False] * (11 - first)
  assert s.tokens[0, :first + 1].tolist() == g.tokens[0, :first + 1].tolist()
  assert (s.tokens[0, first + 1:] == TOK.pad_id).all() and (s.logps[0, first + 1:] == 0).all()
  assert s.lengths.tolist() == [first + 1, 12] and s.truncated.tolist() == [False, True]
  np.testing.assert_array_equal(s.tokens[1], g.tokens[1])  # the stopped row changed nothing in the other
  assert s.response_mask[1].all()


# ---- log-probs: the sampler's, the scorer's, a preference pair's ------------------------------------

SETTINGS = {"t1": dict(temperature=1.0), "t0.7": dict(temperature=0.7), "topk5": dict(top_k=5),
            "t0.8_topp0.9": dict(temperature=0.8, top_p=0.9), "greedy": dict(temperature=0.0)}
FAST_SETTINGS = ("t1", "t0.8_topp0.9")


@pytest.mark.parametrize("name", [n if n in FAST_SETTINGS else pytest.param(n, marks=pytest.mark.slow) for n in SETTINGS])
def test_sampler_logps_equal_a_fresh_forward_of_the_same_distribution(name):
  scfg = S.SamplingConfig(max_new_tokens=12, stop_ids=(EOS,), pad_id=TOK.pad_id, **SETTINGS[name])
  s, prompt_BxP, lengths_B = _run(MODERN, PROMPTS, scfg, seed=2)
  model, params = _init(MODERN)
  batch = S.response_batch(jnp.asarray(prompt_BxP), jnp.asarray(lengths_B), S.Samples(*map(jnp.asarray, s)),
                           TOK.pad_id)
  scored = _score(model, params, batch, scfg)
  got = np.asarray(-scored.nll)[np.asarray(batch["loss_mask"])]
  assert got.size == int(s.lengths.sum()) > 10
  # float32, a cached decode against a fresh full forward: rounding only (1.07e-5 measured at one of 48
  # tokens of topk5 on a 2-core Xeon, 2026-12-06; a wrong distribution is off by 1e-2 or more)
  np.testing.assert_allclose(s.logps[s.response_mask], got, atol=3e-5)
  if name in ("t1", "greedy"):  # the model's own distribution: next_token.score gives the same numbers
    plain = next_token.sequence_sums(_plain_score(model, params, batch), batch["loss_mask"])  # sequence_logps' sums
    np.testing.assert_allclose(np.asarray(plain[0]), s.logps.sum(axis=1), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(plain[1]), s.lengths)
  else:  # and a different one from it: the check can tell temperature and truncation apart
    plain = np.asarray(-_plain_score(model, params, batch).nll)[np.asarray(batch["loss_mask"])]
    assert np.abs(plain - got).max() > 1e-2


def _pair_batch(prompts, responses, T):
  """A `PairRows` batch (the preference data layer's rows) of pair i = (prompt i + response 2i,
  prompt i + response 2i+1), built from token ids: flags on each response, as `sft.render_pairs` sets them."""
  docs = [(p + r, [False] * len(p) + [True] * len(r)) for i, p in enumerate(prompts) for r in responses[2 * i:2 * i + 2]]
  split = Split(ids=np.concatenate([d for d, _ in docs]).astype(np.int64),
                doc_starts=np.cumsum([0] + [len(d) for d, _ in docs]),
                flags=np.concatenate([f for _, f in docs]).astype(bool))
  rows = streams.PairRows(split, T, TOK.pad_id, document_masking=False, seed=0, key=0, shuffle=False,
                          max_prompt_length=T, max_response_length=T)
  return rows.fields(np.arange(len(prompts)))


def test_a_sampled_response_scores_the_same_as_a_preference_pair_of_the_same_ids():
  """Two responses per prompt, temperature 1: their summed sampler log-probs equal `preference.pair_logps`
  of a pair batch the data layer builds from the same prompt and response ids."""
  scfg = S.SamplingConfig(max_new_tokens=10, stop_ids=(EOS,), pad_id=TOK.pad_id)
  prompts = [PROMPTS[0], PROMPTS[2]]
  s, _, _ = _run(MODERN, [p for p in prompts for _ in range(2)], scfg, seed=4)
  responses = [s.tokens[i][s.response_mask[i]].tolist() for i in range(4)]
  model, params = _init(MODERN)
  batch = {k: jnp.asarray(v) for k, v in _pair_batch(prompts, responses, MODERN.max_len).items()}
  pairs = preference.pair_logps(_plain_score(model, params, batch), batch["loss_mask"])
  sums = s.logps.sum(axis=1).reshape(2, 2)
  np.testing.assert_allclose(np.asarray(pairs.chosen), sums[:, 0], atol=1e-4)
  np.testing.assert_allclose(np.asarray(pairs.rejected), sums[:, 1], atol=1e-4)
  np.testing.assert_array_equal(np.asarray(pairs.chosen_tokens), s.lengths.reshape(2, 2)[:, 0])


@pytest.mark.parametrize("prompt", ["hi there", pytest.param([{"role": "user", "content": "reverse abc"}], marks=pytest.mark.slow)],
                         ids=["plain", "chat"])
def test_a_prompt_is_rendered_as_a_preference_pair_renders_it(prompt):
  """The notebook's prompt ids are the tokens a preference pair puts before its first scored token,
  and its stop ids are the token that ends that pair's response (EOS, or the chat turn's <|end|>)."""
  from lmobjective.analysis import inspection
  model, params = _init(MODERN)
  run = inspection.Run(workdir="", config=None, params=params, tokenizer=TOK, model=model, step=0, metrics=[])
  ids, lengths, flags = sft.render_pairs([{"prompt": prompt, "chosen": "ok", "rejected": "no"}], TOK)
  doc, doc_flags = ids[:lengths[0]], flags[:lengths[0]]
  first, last = np.flatnonzero(doc_flags)[[0, -1]]
  assert run.prompt_ids(prompt) == doc[:first].tolist()
  assert doc[last] == run.stop_ids(prompt)[0]  # the response's own terminator
  out = run.sample([prompt, prompt], max_new_tokens=6, temperature=0.0)
  assert out.tokens.shape == (2, 6)
  assert run.generate(prompt, max_new_tokens=6, temperature=0.0) == TOK.decode(
      [t for t in out.tokens[0][out.response_mask[0]] if t not in run.stop_ids(prompt)])


# ---- the distribution's frequencies ------------------------------------------------------------------

TWO = np.log([0.3, 0.7])
THREE = np.log([0.5, 0.3, 0.2])


@pytest.mark.parametrize("logits,kw,p_first", [
    (TWO, dict(temperature=1.0), 0.3),
    (TWO, dict(temperature=0.7), 0.3 ** (1 / 0.7) / (0.3 ** (1 / 0.7) + 0.7 ** (1 / 0.7))),
    (THREE, dict(top_k=2), 0.5 / 0.8),
    (THREE, dict(top_p=0.75), 0.5 / 0.8),  # 0.5 < 0.75 <= 0.8: the nucleus is the two most likely
], ids=["t1", "t0.7", "topk2", "topp0.75"])
def test_empirical_frequencies_match_the_distribution_within_4_standard_errors(logits, kw, p_first):
  n = 20_000
  scfg = S.SamplingConfig(max_new_tokens=1, **kw)
  logp_NxV = S.logps(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits))), scfg)
  np.testing.assert_allclose(np.exp(np.asarray(logp_NxV[0, 0])), p_first, rtol=1e-5)
  draws = np.asarray(S.draw(logp_NxV, S.row_keys(0, 0, jnp.arange(n)), scfg))
  assert set(np.unique(draws)) <= {0, 1}  # truncated ids are never drawn
  se = np.sqrt(p_first * (1 - p_first) / n)
  assert abs((draws == 0).mean() - p_first) < 4 * se, ((draws == 0).mean(), p_first, se)


def test_the_models_first_token_frequencies_match_its_top2_distribution():
  """Through the whole sampler: 4,096 rows of one prompt, one token each, top-k 2: the most likely
  token's share is its renormalised probability (`Sampler.next_logps`) within 4 standard errors."""
  scfg = S.SamplingConfig(max_new_tokens=1, top_k=2, pad_id=TOK.pad_id)
  n = 4096
  s, _, _ = _run(MODERN, [PROMPTS[3]] * n, scfg, seed=11)
  logp = np.asarray(_sampler(MODERN).next_logps(_init(MODERN)[1], [PROMPTS[3]], scfg))[0]
  top2 = np.argsort(-logp)[:2]
  p = float(np.exp(logp[top2[0]]))
  assert 0.05 < p < 0.95 and np.isclose(np.exp(logp[top2]).sum(), 1.0, atol=1e-6)
  assert set(np.unique(s.tokens[:, 0])) <= set(top2.tolist())
  se = np.sqrt(p * (1 - p) / n)
  assert abs((s.tokens[:, 0] == top2[0]).mean() - p) < 4 * se


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,says", [
    (dict(top_p=0.0), "top_p=0.0: must be in (0, 1]"), (dict(top_p=1.5), "top_p=1.5: must be in (0, 1]"),
    (dict(temperature=-0.5), "temperature=-0.5: must be >= 0"), (dict(top_k=-1), "top_k=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"), (dict(temperature=float("nan")), "temperature=nan"),
])
def test_bad_settings_are_refused_in_one_line(kw, says):
  with pytest.raises(ValueError) as e:
    S.SamplingConfig(**{"max_new_tokens": 4, **kw})
  assert says in str(e.value) and "\n" not in str(e.value)


def test_a_prompt_that_leaves_no_room_is_refused_in_one_line_naming_it():
  scfg = S.SamplingConfig(max_new_tokens=40)
  with pytest.raises(ValueError) as e:
    _sampler(MODERN).layout([[EOS], [EOS] * 9], scfg)
  assert str(e.value) == "prompt 1 has 9 tokens: more than context_length 48 - max_new_tokens 40 = 8"
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    _sampler(MODERN).layout([[]], scfg)
  with pytest.raises(ValueError, match="max_new_tokens=48: leaves no room"):
    _sampler(MODERN).layout([[EOS]], S.SamplingConfig(max_new_tokens=48))


# ---- 8 devices ---------------------------------------------------------------------------------------

MESHES = [(8, 1, 1), (2, 2, 2)]


def worker() -> dict:
  """In a process with 8 devices: the same prompts on each mesh, params placed by their declared
  shardings; the tokens, the log-probs, and where the compiled program put the batch and the cache."""
  from lmobjective import hlo
  model, params = _init(MODERN)
  prompts = PROMPTS * 2  # 8 rows
  scfg = S.SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, stop_ids=(EOS,), pad_id=TOK.pad_id)
  out = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(types.SimpleNamespace(**dict(zip(sharding.MESH_AXES, shape))))
    placed = jax.device_put(params, sharding.param_shardings(model, mesh, (1, 8)))
    sampler = S.Sampler(model, mesh, bucket=8)
    s, _, _ = sampler(placed, prompts, scfg, seed=5)
    (exe,) = sampler.program.executables
    loop = hlo.loop_collectives(exe.as_text())
    out["x".join(map(str, shape))] = {
        "tokens": np.asarray(s.tokens).tolist(), "logps": np.asarray(s.logps).tolist(),
        "prompt_sharding": str(exe.input_shardings[0][1].spec),
        "rows_per_shard": {a.shape[0] for a in (x.data for x in s.tokens.addressable_shards)}.pop(),
        "loop": [(c.kind, c.op_name) for c in loop]}
  return out


@pytest.mark.slow
def test_on_8_devices_the_tokens_are_the_one_device_tokens():
  result = run_on_8_devices(__file__)
  prompts = PROMPTS * 2
  scfg = S.SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, stop_ids=(EOS,), pad_id=TOK.pad_id)
  one, _, _ = _run(MODERN, prompts, scfg, seed=5)
  for mesh, r in result.items():
    np.testing.assert_array_equal(np.asarray(r["tokens"]), one.tokens, err_msg=mesh)
    np.testing.assert_allclose(np.asarray(r["logps"]), one.logps, atol=5e-5, err_msg=mesh)  # other shapes, other rounding
    assert r["prompt_sharding"] == "P(('data', 'fsdp'),)", (mesh, r["prompt_sharding"])
  assert result["8x1x1"]["rows_per_shard"] == 1 and result["2x2x2"]["rows_per_shard"] == 2  # 8 rows / (data x fsdp)
  # Structure, not only numbers: on 8 data shards the decode loop talks only to agree on stopping
  # (all rows done?); on 2x2x2 the tensor axis adds its all-reduces (attention and MLP outputs) and
  # the vocabulary's gathers for top-p, but no weight is gathered per token (fsdp is gathered once).
  assert {k for k, _ in result["8x1x1"]["loop"]} <= {"all-reduce"}, result["8x1x1"]["loop"]
  loop = result["2x2x2"]["loop"]
  assert any(k == "all-reduce" and "attn/out/dot_general" in name for k, name in loop), loop
  assert not [name for k, name in loop if k == "all-gather" and "Transformer" in name], loop


if __name__ == "__main__":
  print(json.dumps(worker()))
