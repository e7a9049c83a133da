"""Train/validation assignment by a stable hash of a document's path."""

import hashlib

TRAIN = "train"
VALIDATION = "validation"
VALIDATION_FRACTION = 0.05


def split_of(path: str) -> str:
  """Returns VALIDATION for about 5% of paths, TRAIN for the rest.

  sha256 rather than hash(): Python salts str hashes per process, and a document must land
  in the same split in every process, run and machine.
  """
  digest = hashlib.sha256(path.encode("utf-8")).digest()
  if int.from_bytes(digest[:8], "big") < VALIDATION_FRACTION * 2**64:
    return VALIDATION
  return TRAIN
