"""How run/save_watch.py words a failed save: the disk, the file, in a few words."""

import pytest

from lmobjective.run import save_watch


@pytest.mark.parametrize("message", [
    'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/4/d/e571": [OS error 28]',
    'RESOURCE_EXHAUSTED: Failed writing: "/w/checkpoints/4/d/e571"',  # what CI's tensorstore printed
])
def test_a_tensorstore_full_disk_reads_as_no_space_naming_the_file(message):
  assert save_watch._reason(ValueError(message), "/w/checkpoints/4") == "No space left on device: /w/checkpoints/4/d/e571"


def test_an_unknown_error_keeps_its_type_and_first_line():
  assert save_watch._reason(ValueError("boom\nmore"), "/w") == "ValueError: boom"
