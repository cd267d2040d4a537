"""The batch contract every layer of unijax shares (docs/data.md).

A batch is a dict of arrays `[batch, seq]` (plus `patches [batch, seq, P]`):

  tokens        text ids; the image placeholder at understanding slots; VQ codes at generated slots
  modality      per token: `TEXT`, `UND_IMAGE` (an understanding-image slot) or `GEN_IMAGE` (a
                generated-image code)
  task          per token: `MMU` (understanding) or `T2I` (generation); the TA-MoE group id too
  text_weights / image_weights   per-position loss weights of the two heads
  patches       the pixels under each image token
  bad           on the single token of a skipped sample: 1 a bad record, 2 too long (data.overflow)
  segment_ids / positions        padding (segment 0) and packing

Model code, data pipelines, losses, evaluators and analysis tools import these names from here and
nowhere else, so this module imports nothing of unijax.
"""

TEXT, UND_IMAGE, GEN_IMAGE = 0, 1, 2  # per-token modality
MODALITIES = ("text", "und_image", "gen_image")  # index == modality id

MMU, T2I = 0, 1  # per-token task == TA-MoE expert group
TASKS = ("mmu", "t2i")  # index == task id
TASK_IDS = {name: i for i, name in enumerate(TASKS)}

IMAGE_MARKER = "<image>"  # where an image sits in a conversation's text (LLaVA's mark; raw samples)

SEQ_FEATURES = ("tokens", "modality", "task", "text_weights", "image_weights", "patches", "bad")
BATCH_KEYS = SEQ_FEATURES + ("segment_ids", "positions")  # what the train step reads
