"""packing.py: hand-aligned tables of tokens, segment ids, positions, targets and loss masks."""

import numpy as np

from lmobjective.data import packing

EOS = 1


def _stream():
  ids = np.array([5, 6, 7, 8, 9, 10])
  return packing.append_eos(ids, np.array([3, 2, 1]), EOS)


def test_append_eos_table():
  stream, starts = _stream()
  np.testing.assert_array_equal(stream, [5, 6, 7, 1, 8, 9, 1, 10, 1])
  np.testing.assert_array_equal(starts, [0, 4, 7, 9])


def test_concat_rows_document_masking_table():
  stream, _ = _stream()
  assert packing.num_concat_rows(len(stream), 4) == 2
  f = packing.lm_fields(packing.concat_rows(stream, np.array([0, 1]), 4), EOS, document_masking=True)
  np.testing.assert_array_equal(f["inputs"], [[5, 6, 7, 1], [8, 9, 1, 10]])
  np.testing.assert_array_equal(f["targets"], [[6, 7, 1, 8], [9, 1, 10, 1]])
  # EOS ends its document as a target and opens the next one as an input (it doubles as BOS).
  np.testing.assert_array_equal(f["segment_ids"], [[1, 1, 1, 2], [1, 1, 2, 2]])
  np.testing.assert_array_equal(f["positions"], [[0, 1, 2, 0], [0, 1, 0, 1]])
  assert f["loss_mask"].all()
  assert f["inputs"].dtype == np.int32 and f["segment_ids"].dtype == np.int32 and f["loss_mask"].dtype == bool


def test_concat_rows_without_document_masking_table():
  stream, _ = _stream()
  f = packing.lm_fields(packing.concat_rows(stream, np.array([0, 1]), 4), EOS, document_masking=False)
  np.testing.assert_array_equal(f["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(f["positions"], [[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_array_equal(f["targets"], [[6, 7, 1, 8], [9, 1, 10, 1]])


def test_row_starting_with_eos_is_one_document():
  f = packing.lm_fields(np.array([[1, 5, 6, 1, 7]]), EOS, document_masking=True)
  np.testing.assert_array_equal(f["segment_ids"], [[1, 1, 1, 2]])
  np.testing.assert_array_equal(f["positions"], [[0, 1, 2, 0]])


def test_every_token_but_the_first_is_a_target_exactly_once():
  stream = np.random.default_rng(0).integers(2, 50, size=1001)
  T = 7
  n = packing.num_concat_rows(len(stream), T)
  f = packing.lm_fields(packing.concat_rows(stream, np.arange(n), T), EOS, True)
  np.testing.assert_array_equal(f["targets"].ravel(), stream[1:1 + n * T])
  assert len(stream) - 1 - n * T == 1000 - 142 * 7 == 6  # the reported remainder, < T


def test_window_is_a_pure_function_of_seed_and_index():
  a = packing.window_starts(0, 7, np.arange(1000), stream_len=500, T=16)
  b = packing.window_starts(0, 7, np.arange(1000), stream_len=500, T=16)
  c = packing.window_starts(1, 7, np.arange(1000), stream_len=500, T=16)
  np.testing.assert_array_equal(a, b)
  assert (a != c).mean() > 0.9
  assert a.min() >= 0 and a.max() <= 500 - 17
  assert len(np.unique(a)) > 400  # spread over the valid offsets (484 of them)
  np.testing.assert_array_equal(packing.window_starts(0, 7, np.array([5, 3]), 500, 16), a[[5, 3]])


def test_first_fit_padded_table():
  ids = np.array([11, 12, 13, 21, 22, 31, 32, 33, 34])
  flags = np.array([0, 1, 1, 0, 1, 0, 1, 1, 1], bool)
  tokens, seg, fl, acct = packing.pack_padded(ids, np.array([3, 2, 4]), flags, capacity=5, pad_id=0)
  np.testing.assert_array_equal(tokens, [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]])
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
  assert acct == {"rows": 2, "padding_fraction": 0.09999999999999998, "truncated_documents": 0,
                  "truncated_tokens": 0}
  f = packing.padded_fields(tokens, seg, fl, document_masking=True)
  np.testing.assert_array_equal(f["inputs"], [[11, 12, 13, 21], [31, 32, 33, 34]])
  np.testing.assert_array_equal(f["targets"], [[12, 13, 21, 22], [32, 33, 34, 0]])
  np.testing.assert_array_equal(f["loss_mask"], [[1, 1, 0, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(f["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1]])
  np.testing.assert_array_equal(f["positions"], [[0, 1, 2, 0], [0, 1, 2, 3]])
  np.testing.assert_array_equal(f["target_valid"], [[1, 1, 1, 1], [1, 1, 1, 0]])
  g = packing.padded_fields(tokens, seg, fl, document_masking=False)
  np.testing.assert_array_equal(g["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(g["positions"], [[0, 1, 2, 3], [0, 1, 2, 3]])
  np.testing.assert_array_equal(g["loss_mask"], f["loss_mask"])  # never across conversations


def test_first_fit_places_in_first_bin_with_room_and_counts_truncation():
  np.testing.assert_array_equal(packing.first_fit(np.array([4, 3, 1, 2, 1]), 5), [0, 1, 0, 1, 2])
  _, _, _, acct = packing.pack_padded(np.arange(12), np.array([7, 5]), np.ones(12, bool), 5, 0)
  assert acct["truncated_documents"] == 1 and acct["truncated_tokens"] == 2 and acct["rows"] == 2
