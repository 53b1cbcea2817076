"""synthetic.py: the exact entropy rate of the Markov source against a Monte-Carlo estimate."""

import math

import numpy as np
import pytest

from lmobjective.data import synthetic


@pytest.mark.parametrize("order,num_symbols,concentration", [(1, 16, 0.2), (2, 8, 0.5)])
def test_entropy_rate_matches_monte_carlo(order, num_symbols, concentration):
  chain = synthetic.build_chain(order, num_symbols, concentration, seed=3)
  seqs = chain.sample(200, 2000 + order, np.random.default_rng(0))  # 400k scored symbols, stationary start
  nll = []
  for seq in seqs:  # the first `order` symbols are the state the rest is scored from
    state = int(np.sum(seq[:order] * num_symbols ** np.arange(order - 1, -1, -1)))
    nll.append(-chain.log_probs(seq[order:], state))
  mc, exact = float(np.mean(np.concatenate(nll))), chain.entropy_rate_nats()
  assert abs(mc - exact) / exact < 0.01, (mc, exact)
  assert chain.entropy_rate_bits() == pytest.approx(exact / math.log(2))


def test_stationary_distribution_is_stationary():
  chain = synthetic.build_chain(2, 5, 0.3, seed=1)
  n, s = chain.transitions_NxS.shape
  dest = (np.arange(n)[:, None] * s + np.arange(s)[None, :]) % n
  pushed = np.bincount(dest.ravel(), (chain.stationary_N[:, None] * chain.transitions_NxS).ravel(), minlength=n)
  np.testing.assert_allclose(pushed, chain.stationary_N, atol=1e-12)


def test_vectorised_sampler_has_the_chain_statistics():
  chain = synthetic.build_chain(1, 6, 0.5, seed=2)
  seqs = chain.sample(400, 500, np.random.default_rng(0))
  counts = np.zeros((6, 6))
  np.add.at(counts, (seqs[:, :-1].ravel(), seqs[:, 1:].ravel()), 1)
  empirical = counts / counts.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(empirical, chain.transitions_NxS, atol=0.02)
  np.testing.assert_allclose(np.bincount(seqs.ravel(), minlength=6) / seqs.size, chain.stationary_N, atol=0.01)


def test_documents_are_printable_single_byte_and_seeded():
  from conftest import markov_config
  m = markov_config().data.sources.m0.markov
  docs, chain = synthetic.markov_documents(m)
  again, _ = synthetic.markov_documents(m)
  assert docs == again and len(docs) == 200 and all(len(d) == len(d.encode()) == 300 for d in docs)
  assert set("".join(docs)) <= set(synthetic.ALPHABET[:16])
  assert 0 < chain.entropy_rate_bits() < math.log2(16)
