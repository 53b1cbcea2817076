"""`markov`: a seeded order-k Markov chain over printable single-byte characters, with its exact entropy rate.

Each transition row is drawn from Dirichlet(concentration). The entropy rate
H = sum_s pi(s) * H(P[s, :]) (pi = stationary distribution over k-symbol states) is the
floor a perfect model reaches, in nats per symbol; each symbol is one byte, so bits per
symbol == bits per byte. Letters: S = num_symbols, K = order, N = S**K states.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Printable, non-whitespace ASCII: one byte each under UTF-8, so byte counts are exact.
ALPHABET = "".join(chr(c) for c in range(33, 127))


@dataclasses.dataclass(frozen=True)
class MarkovChain:
  order: int
  transitions_NxS: np.ndarray  # P[state, next symbol]; state = base-S number of the last K symbols
  stationary_N: np.ndarray

  @property
  def num_symbols(self) -> int:
    return self.transitions_NxS.shape[1]

  def entropy_rate_nats(self) -> float:
    p = self.transitions_NxS
    row_h_N = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return float(self.stationary_N @ row_h_N)

  def entropy_rate_bits(self) -> float:
    return self.entropy_rate_nats() / math.log(2)

  def next_states(self, states: np.ndarray, symbols: np.ndarray) -> np.ndarray:
    return (states * self.num_symbols + symbols) % self.transitions_NxS.shape[0]

  def sample(self, num_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Symbols [num_sequences, length], started from the stationary distribution (so stationary)."""
    n_states = self.transitions_NxS.shape[0]
    cdf_NxS = np.cumsum(self.transitions_NxS, axis=1)
    cdf_NxS[:, -1] = 1.0
    states = rng.choice(n_states, size=num_sequences, p=self.stationary_N)
    out = np.empty((num_sequences, length), np.int64)
    u = rng.random((length, num_sequences))
    for t in range(length):  # vectorised over sequences; `length` steps
      sym = (u[t][:, None] > cdf_NxS[states]).sum(axis=1)
      out[:, t] = sym
      states = self.next_states(states, sym)
    return out

  def log_probs(self, symbols_L: np.ndarray, initial_state: int) -> np.ndarray:
    """log p(x_t | previous K symbols) along one sequence (for Monte-Carlo checks)."""
    s, n = self.num_symbols, self.transitions_NxS.shape[0]
    # state_t = base-S number of the K symbols before t; built from the sequence, not by a loop.
    prev = np.concatenate([_digits(initial_state, s, self.order), symbols_L[:-1]])
    acc = np.zeros(len(symbols_L), np.int64)
    for j in range(self.order):
      acc = acc * s + prev[j:j + len(symbols_L)]
    states = acc % n
    return np.log(self.transitions_NxS[states, symbols_L])


def _digits(state: int, base: int, k: int) -> np.ndarray:
  return np.array([(state // base**(k - 1 - j)) % base for j in range(k)], np.int64)


def build_chain(order: int, num_symbols: int, concentration: float, seed: int) -> MarkovChain:
  rng = np.random.default_rng([seed, 0x4D41524B])  # 'MARK'
  n = num_symbols**order
  p = rng.dirichlet(np.full(num_symbols, concentration), size=n)
  p = np.maximum(p, 1e-300)
  p /= p.sum(axis=1, keepdims=True)
  return MarkovChain(order, p, _stationary(p, order))


def _stationary(p_NxS: np.ndarray, order: int) -> np.ndarray:
  n, s = p_NxS.shape
  dest_NxS = (np.arange(n)[:, None] * s + np.arange(s)[None, :]) % n
  pi = np.full(n, 1.0 / n)
  for _ in range(100_000):  # power iteration; rows are strictly positive so it converges
    new = np.bincount(dest_NxS.ravel(), weights=(pi[:, None] * p_NxS).ravel(), minlength=n)
    new /= new.sum()
    if np.abs(new - pi).max() < 1e-15:
      return new
    pi = new
  return pi


def to_text(symbols: np.ndarray) -> str:
  return np.frombuffer(ALPHABET.encode(), np.uint8)[symbols].tobytes().decode("ascii")


def markov_documents(mcfg) -> tuple[list[str], MarkovChain]:
  """`num_documents` documents of `document_length` symbols, and the chain that made them."""
  chain = build_chain(mcfg.order, mcfg.num_symbols, mcfg.concentration, mcfg.seed)
  rng = np.random.default_rng([mcfg.seed, 0x444F4353])  # 'DOCS'
  symbols = chain.sample(mcfg.num_documents, mcfg.document_length, rng)
  return [to_text(row) for row in symbols], chain
