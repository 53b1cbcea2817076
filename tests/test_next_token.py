"""The objective against float64 NumPy, known entropies and hand-computed tables."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmobjective.objectives import next_token


def reference_cross_entropy(logits, targets, mask):
  """float64 NumPy: sum of -log softmax(logits)[target] over valid positions, and their count."""
  logits = np.asarray(logits, np.float64)
  valid = (targets >= 0) & mask
  m = logits.max(-1, keepdims=True)
  log_probs = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  return np.where(valid, nll, 0.0).sum(), int(valid.sum()), np.where(valid, nll, 0.0)


def _random_case(seed, B=4, T=33, V=97, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, scale, (B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  targets[rng.random((B, T)) < 0.2] = next_token.IGNORE_INDEX
  mask = rng.random((B, T)) < 0.8
  return logits, targets, mask


@pytest.mark.parametrize("seed,shape", [(0, (4, 33, 97)), (1, (4, 33, 97)), (2, (8, 257, 97)),
                                        (3, (8, 1024, 2048)), (4, (2, 64, 50304))])
def test_cross_entropy_matches_float64_reference(seed, shape):
  logits, targets, mask = _random_case(seed, *shape)
  ref_sum, ref_n, _ = reference_cross_entropy(logits, targets, mask)
  loss_sum, n = next_token.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert int(n) == ref_n
  assert abs(float(loss_sum) / int(n) - ref_sum / ref_n) < 1e-6
  assert abs(float(loss_sum) - ref_sum) / ref_sum < 1e-6


def test_cross_entropy_bf16_logits_use_float32_log_softmax():
  logits, targets, mask = _random_case(3)
  logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
  # The reference sees exactly the bf16 values; the objective must not lose more than float32 does.
  ref_sum, ref_n, _ = reference_cross_entropy(np.asarray(logits_bf16.astype(jnp.float32)), targets, mask)
  loss_sum, n = next_token.cross_entropy(logits_bf16, jnp.asarray(targets), jnp.asarray(mask))
  assert int(n) == ref_n
  assert abs(float(loss_sum) / int(n) - ref_sum / ref_n) < 1e-6


def test_ignore_index_without_mask():
  logits, targets, _ = _random_case(4)
  ref_sum, ref_n, _ = reference_cross_entropy(logits, targets, np.ones(targets.shape, bool))
  loss_sum, n = next_token.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert int(n) == ref_n == int((targets >= 0).sum())
  np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-6)


def test_all_masked_is_zero_zero_not_nan():
  logits, targets, _ = _random_case(5)
  loss_sum, n = next_token.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                        jnp.zeros(targets.shape, bool))
  assert (float(loss_sum), int(n)) == (0.0, 0)
  all_ignored = jnp.full(targets.shape, -100)
  assert tuple(map(float, next_token.cross_entropy(jnp.asarray(logits), all_ignored))) == (0.0, 0.0)
  # and its gradient is zero, not NaN
  g = jax.grad(lambda l: next_token.cross_entropy(l, all_ignored)[0])(jnp.asarray(logits))
  assert float(jnp.abs(g).max()) == 0.0


def test_uniform_logits_give_ln_v():
  V = 1000
  loss_sum, n = next_token.cross_entropy(jnp.zeros((2, 5, V)), jnp.ones((2, 5), jnp.int32))
  assert abs(float(loss_sum) / int(n) - math.log(V)) < 1e-6


def test_known_distribution_entropy():
  # Targets drawn in exact proportion to p; logits = log p -> mean loss = entropy H(p).
  p = np.array([0.5, 0.25, 0.125, 0.125])
  targets = np.array([[0, 0, 0, 0, 1, 1, 2, 3]], np.int32)
  logits = np.broadcast_to(np.log(p), (1, 8, 4))
  loss_sum, n = next_token.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  entropy_nats = -(p * np.log(p)).sum()
  assert abs(float(loss_sum) / int(n) - entropy_nats) < 1e-6
  m = next_token.summarize(loss_sum, n)
  assert abs(m["bits_per_token"] - 1.75) < 1e-6  # H = 1.75 bits exactly
  assert abs(m["perplexity"] - 2 ** 1.75) < 1e-5


def test_token_losses_table():
  logits, targets, mask = _random_case(6, B=2, T=5, V=7)
  _, _, ref_nll = reference_cross_entropy(logits, targets, mask)
  tl = next_token.token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(tl.nll), ref_nll, atol=1e-5)
  valid = (targets >= 0) & mask
  np.testing.assert_allclose(np.asarray(tl.p_target), np.where(valid, np.exp(-ref_nll), 0.0), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(tl.valid), valid)
  argmax_right = np.argmax(logits, -1) == targets
  np.testing.assert_array_equal(np.asarray(tl.correct), (argmax_right & valid).astype(np.float32))


def test_loss_sums_bytes_and_bits_per_byte():
  logits, targets, mask = _random_case(7, V=11)
  token_bytes = np.arange(11, dtype=np.int32) % 4  # some tokens stand for 0 bytes (e.g. EOS)
  sums = next_token.loss_sums(next_token.token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)),
                             jnp.asarray(token_bytes))
  valid = (targets >= 0) & mask
  ref_bytes = token_bytes[np.where(valid, targets, 0)][valid].sum()
  assert float(sums.bytes_sum) == ref_bytes
  ref_sum, ref_n, _ = reference_cross_entropy(logits, targets, mask)
  m = next_token.summarize(sums.loss_sum, sums.num_tokens, sums.bytes_sum, sums.correct_sum)
  assert abs(m["bits_per_byte"] - ref_sum / math.log(2) / ref_bytes) < 1e-6
  assert m["num_tokens"] == ref_n


def test_sums_aggregate_token_weighted():
  # Two "devices" with very different token counts: the mean of means is wrong, sum/sum is right.
  logits, targets, mask = _random_case(8, B=2)
  mask[0, :] = False
  mask[0, :3] = True
  parts = [next_token.cross_entropy(jnp.asarray(logits[i:i + 1]), jnp.asarray(targets[i:i + 1]),
                                   jnp.asarray(mask[i:i + 1])) for i in range(2)]
  total_sum, total_n = sum(float(p[0]) for p in parts), sum(int(p[1]) for p in parts)
  whole_sum, whole_n = next_token.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert total_n == int(whole_n)
  assert abs(total_sum / total_n - float(whole_sum) / int(whole_n)) < 1e-6


def test_objective_sum_with_z_loss():
  logits, targets, mask = _random_case(9)
  sums = next_token.loss_sums(next_token.token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
  valid = (targets >= 0) & mask
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  ref_z = (lse ** 2)[valid].sum()
  ref_sum, ref_n, _ = reference_cross_entropy(logits, targets, mask)
  got = float(next_token.objective_sum(sums, z_loss=1e-4)) / int(sums.num_tokens)
  np.testing.assert_allclose(got, (ref_sum + 1e-4 * ref_z) / ref_n, rtol=1e-6)
