"""Masked-language-model inputs for SimCSE's auxiliary MLM objective (host-side, numpy).

The reference collator (BERT's recipe): choose each non-special token with probability
`mlm_probability` (0.15); of the chosen, 80 % become the mask token, 10 % a random vocabulary
token, 10 % stay. Labels are the original ids at chosen positions and -100 elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: np.ndarray,
    special_ids: Iterable[int],
    *,
    mask_token_id: int,
    vocab_size: int,
    rng: np.random.Generator,
    mlm_probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """(masked_input_ids, labels), both shaped like `input_ids` (any shape, int).

    `special_ids` are never chosen (CLS, SEP, PAD, ... : the tokenizer's `all_special_ids`).
    Draws come from `rng` in a fixed order, so a seeded generator reproduces the masks.
    """
    input_ids = np.asarray(input_ids)
    special = np.isin(input_ids, np.fromiter(special_ids, dtype=input_ids.dtype))
    chosen = (rng.random(input_ids.shape) < mlm_probability) & ~special
    labels = np.where(chosen, input_ids, IGNORE_INDEX).astype(np.int32)
    draw = rng.random(input_ids.shape)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    masked = input_ids.copy()
    masked[to_mask] = mask_token_id
    masked[to_random] = rng.integers(0, vocab_size, size=int(to_random.sum()))
    return masked.astype(np.int32), labels
