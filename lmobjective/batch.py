"""The batch the model and the objective read, named once (no imports: the data package uses it too).

Every field is [B, T]: `inputs` and `targets` int32 ids (teacher forcing happens once, when rows
are cut: targets = inputs shifted by one), `loss_mask` bool (the target is scored),
`segment_ids` int32 (document of each position, 0 = padding), `positions` int32 (position inside
its document). A target id of IGNORE_INDEX is never scored, whatever the mask says.

Pair batches of a cached reference (`objective.reference="cached"`) also carry REFERENCE_LOGPS,
float32 [B]: the frozen reference's summed response log-prob of each row (0 on padding pairs). Pair
batches carry MARGIN, float32 [B]: each pair's `margin` on both its rows (0 where the data gives
none, and on padding pairs), which the reward model's Bradley–Terry loss subtracts.
"""

MODEL_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
IGNORE_INDEX = -100


REFERENCE_LOGPS = "reference_logps"
MARGIN = "margin"
ROW_FIELDS = (REFERENCE_LOGPS, MARGIN)  # float32 [B]: one value per row


def field_dtype(field: str) -> str:
  """The dtype of a batch field: `loss_mask` bool, ROW_FIELDS float32, the rest ([B, T]) int32."""
  return "bool" if field == "loss_mask" else "float32" if field in ROW_FIELDS else "int32"
