"""Errors and warnings of the data package: every message is one line naming the source, file or key."""


class DataError(ValueError):
  """Bad data found while building (not a bad config value): e.g. token ids outside the vocabulary."""


class DataWarning(UserWarning):
  """Data was repaired (e.g. invalid UTF-8 replaced) or a cache was ignored; the run goes on."""
