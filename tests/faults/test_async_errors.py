"""The asyncio filter of run/async_errors.py: orbax's abandoned futures are dropped, all else passes."""

import logging

from lmobjective.run import async_errors


def _unretrieved_error_from(filename: str) -> logging.LogRecord:
  """The record asyncio logs for a future whose OSError, raised in `filename`, nobody retrieved."""
  try:
    exec(compile("raise OSError(28, 'No space left on device')", filename, "exec"))
  except OSError as e:
    error = e
  return logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                           "Future exception was never retrieved\nfuture: %s", ("<Future finished exception=%r>" % error,),
                           (type(error), error, error.__traceback__))


def test_only_orbax_unretrieved_futures_are_filtered(caplog):
  async_errors.quiet()
  logger = logging.getLogger("asyncio")
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    # The CI failure: the message names only OSError; the frames are orbax's writer.
    logger.handle(_unretrieved_error_from("/venv/site-packages/orbax/checkpoint/_src/path/async_path.py"))
    assert caplog.records == []
    logger.handle(_unretrieved_error_from("/home/me/my_coroutine.py"))  # someone else's: reported
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
    logger.error("Task was destroyed but it is pending!")
    assert len(caplog.records) == 2


