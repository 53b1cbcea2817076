"""mixture.py + pipeline: realised token shares, seeded order, repeats of a small source, stages."""

import numpy as np
import pytest

from conftest import markov_config
from lmobjective import data
from lmobjective.config import ConfigError
from lmobjective.data import mixture, streams, tokenizers


def _pipe(weights, cache_dir, seed=0, B=64, T=128, mixture_stages="", **kw):
  cfg = markov_config(weights, T=T, **kw)
  cfg.data.mixture_stages = mixture_stages
  return data.build_pipeline(cfg.data, tokenizers.ByteTokenizer(), seed=seed, batch_size=B, cache_dir=cache_dir)


def test_realised_token_shares_within_one_point_after_1m_tokens(cache_dir):
  pipe = _pipe((0.7, 0.2, 0.1), cache_dir)
  counts, steps = np.zeros(3), 123  # 123 * 64 * 128 = 1,007,616 tokens
  for step in range(steps):
    sid = pipe.batch(step)["source_ids"]
    counts += np.bincount(sid[sid >= 0], minlength=3)
  shares = counts / counts.sum()
  assert counts.sum() == steps * 64 * 128
  np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.01)
  # pipe.stats reports the same realised shares, exactly.
  st = pipe.stats(step=steps)["sources"]
  np.testing.assert_allclose([st[n]["realised_share"] for n in ("m0", "m1", "m2")], shares, atol=1e-12)


def test_rows_per_source_matches_assignment_and_never_drifts():
  mix = mixture.Mixture(np.array([0.7, 0.2, 0.1]), seed=3)
  src, _ = mix.assign(np.arange(50_000))
  np.testing.assert_array_equal(mix.rows_per_source(50_000), np.bincount(src, minlength=3))
  for n in (1024, 5000, 33_333, 50_000):  # cumulative quotas: off by < 1 row per window at most
    assert np.abs(np.bincount(src[:n], minlength=3) - n * np.array([0.7, 0.2, 0.1])).max() <= 1024 * 0.35


def test_order_is_random_not_round_robin():
  src, _ = mixture.Mixture(np.array([0.75, 0.25]), seed=0).assign(np.arange(4096))
  runs = np.flatnonzero(np.diff(src)) .size
  assert src[:8].tolist() != [0, 0, 0, 1, 0, 0, 0, 1]
  assert not np.array_equal(src[:1024], src[1024:2048])  # every window has its own order
  # i.i.d.-like: a Bernoulli(0.25) sequence of 4096 has ~2*4096*0.75*0.25 = 1536 switches.
  assert 1300 < runs < 1800


def test_counters_enumerate_each_source_rows_in_order():
  mix = mixture.Mixture(np.array([0.5, 0.3, 0.2]), seed=1)
  src, ctr = mix.assign(np.arange(10_000))
  for s in range(3):
    np.testing.assert_array_equal(ctr[src == s], np.arange((src == s).sum()))


def test_same_seed_same_batches_different_seed_different_order(cache_dir):
  a, b, c = (_pipe((0.7, 0.2, 0.1), cache_dir, seed=s, B=8, T=32) for s in (0, 0, 1))
  for step in range(5):
    for k, v in a.batch(step).items():
      np.testing.assert_array_equal(v, b.batch(step)[k])
  assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])
  assert not np.array_equal(a.batch(0)["source_ids"], c.batch(0)["source_ids"])


def test_small_source_repeats_with_fresh_order_and_reports_epochs(cache_dir):
  pipe = _pipe((0.5, 0.5), cache_dir, B=16, T=32, num_documents=40, document_length=100)
  small = pipe.train_rows[1]
  n = small.num_rows
  first, second = (small.fields(np.arange(e * n, (e + 1) * n))["inputs"] for e in (0, 1))
  key = lambda rows: sorted(map(bytes, rows.astype(np.uint8)))  # noqa: E731
  assert key(first) == key(second)  # each epoch covers every row exactly once...
  assert not np.array_equal(first, second)  # ...in a fresh order
  steps = 3 * n * 2 // 16 + 1
  st = pipe.stats(step=steps)["sources"]["m1"]
  assert st["rows_per_epoch"] == n and st["epochs_seen"] > 3.0
  assert st["epochs_seen"] == pytest.approx(pipe.mixture.rows_per_source(steps * 16)[1] / n)


def test_a_source_order_is_independent_of_other_sources():
  assert streams.source_key("code") == streams.source_key("code") != streams.source_key("prose")


@pytest.mark.parametrize("weights,needle", [
    ({"a": -1.0, "b": 1.0}, "config.data.sources.a.weight=-1.0: must be a finite number >= 0"),
    ({"a": float("nan"), "b": 1.0}, "config.data.sources.a.weight=nan"),
    ({"a": 0.0, "b": 0.0}, "at least one weight must be > 0"),
])
def test_bad_weights(weights, needle):
  with pytest.raises(ConfigError, match=None) as e:
    mixture.normalise(weights)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_weights_are_normalised_in_source_order(cache_dir):
  pipe = _pipe((3.0, 1.0), cache_dir, B=4, T=16)
  assert pipe.source_names == ("m0", "m1")
  np.testing.assert_allclose(pipe.weights, [0.75, 0.25])


def test_many_domains_stay_cheap(cache_dir):
  weights = tuple(np.linspace(1.0, 3.0, 48))
  pipe = _pipe(weights, cache_dir, B=64, T=32, num_documents=20, document_length=100)
  counts = np.zeros(48)
  for step in range(200):  # 409,600 tokens
    sid = pipe.batch(step)["source_ids"]
    counts += np.bincount(sid.ravel(), minlength=48)
  np.testing.assert_allclose(counts / counts.sum(), pipe.weights, atol=0.002)
  st = pipe.stats(step=200)["sources"]
  assert min(s["epochs_seen"] for s in st.values()) > 1.0  # every small source wrapped at least once


# ---- stages: the mixture changes at a step ----------------------------------------------------

W0, W1 = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])


def test_stage_leaves_earlier_rows_alone_and_replays_or_skips_nothing():
  rows_per_step, switch = 96, 40  # the switch lands mid-window (row 3840 of a 1024-row window)
  staged = mixture.StagedMixture(W0, [(switch, W1)], rows_per_step, seed=3)
  plain = mixture.Mixture(W0, seed=3)
  n, at = 12_000, switch * rows_per_step
  src, ctr = staged.assign(np.arange(n))
  src0, ctr0 = plain.assign(np.arange(at))
  np.testing.assert_array_equal(src[:at], src0)  # before the switch: the stage-less deal, row for row
  np.testing.assert_array_equal(ctr[:at], ctr0)
  for s in range(3):  # each source's rows run 0, 1, 2, ... across the switch: no replay, no skip
    np.testing.assert_array_equal(ctr[src == s], np.arange((src == s).sum()))
  after = np.bincount(src[at:], minlength=3)  # the new stage's shares, cumulative quotas from the switch
  assert np.abs(after - (n - at) * W1).max() <= 1024 * 0.35
  assert np.abs(after / (n - at) - W1).max() < 0.02
  for m in (0, 1, at - 1, at, at + 1, 5000, n):  # exact accounting on both sides of the switch
    np.testing.assert_array_equal(staged.rows_per_source(m), np.bincount(src[:m], minlength=3))


def test_batches_before_a_stage_are_unchanged_and_shares_follow_it(cache_dir):
  B, T, switch = 16, 32, 30
  plain = _pipe((0.7, 0.2, 0.1), cache_dir, B=B, T=T)
  staged = _pipe((0.7, 0.2, 0.1), cache_dir, B=B, T=T, mixture_stages=f"{switch}:m0=1,m1=3,m2=6")
  for step in (0, 17, switch - 1):
    for k, v in plain.batch(step).items():
      np.testing.assert_array_equal(v, staged.batch(step)[k], err_msg=f"{k} at step {step}")
  counts = np.zeros(3)
  for step in range(switch, switch + 200):
    sid = staged.batch(step)["source_ids"]
    counts += np.bincount(sid[sid >= 0], minlength=3)
  np.testing.assert_allclose(counts / counts.sum(), [0.1, 0.3, 0.6], atol=0.01)
  st = staged.stats(step=switch + 200)
  assert st["stages"] == [{"step": switch, "weights": {"m0": 0.1, "m1": 0.3, "m2": 0.6}}]
  rows = np.array([st["sources"][n]["realised_share"] for n in ("m0", "m1", "m2")]) * (switch + 200) * B
  np.testing.assert_allclose(rows, staged.mixture.rows_per_source((switch + 200) * B))


@pytest.mark.parametrize("text,needle", [
    ("10:a=1", "stage 10 must give one weight to each of a, b (got a)"),
    ("10:a=1,b=1,c=1", "must give one weight to each of a, b"),
    ("10:a=1,a=2", "must give one weight to each of a, b"),
    ("10:a=1,b=x", "is not STEP:name=weight"),
    ("a=1,b=2", "is not STEP:name=weight"),
    ("0:a=1,b=1", "steps must be > 0 and increasing"),
    ("20:a=1,b=1;10:a=1,b=2", "steps must be > 0 and increasing"),
    ("10:a=-1,b=1", "weights must be finite, >= 0, not all 0"),
    ("10:a=0,b=0", "weights must be finite, >= 0, not all 0"),
])
def test_bad_stages_are_one_line_naming_the_key(text, needle):
  with pytest.raises(ConfigError) as e:
    mixture.parse_stages(text, ("a", "b"))
  assert str(e.value).startswith("config.data.mixture_stages=") and needle in str(e.value)
  assert "\n" not in str(e.value)


def test_first_difference_of_two_schedules():
  w, half = np.array([0.5, 0.5]), np.array([0.25, 0.75])
  assert mixture.first_difference(w, [], w, []) is None
  assert mixture.first_difference(w, [], w, [(100, half)]) == 100
  assert mixture.first_difference(w, [(50, half)], w, [(100, half)]) == 50
  assert mixture.first_difference(w, [(50, half)], w, [(50, half), (80, w)]) == 80
  assert mixture.first_difference(w, [], half, []) == 0
  assert mixture.first_difference(w, [(60, w)], w, []) == 60  # same weights, yet a new stage's own deal
  assert mixture.parse_stages("", ("a", "b")) == [] and mixture.parse_stages(None, ("a",)) == []
