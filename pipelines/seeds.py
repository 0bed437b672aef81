"""Seeds: one rule for every task, the app and the command line.

A seed is a whole number from 0 to `MAX_SEED`; None or a negative number draws a random one
(below 2**31, so it survives any JSON client and the browser's number fields).  Anything else
(a fraction, NaN, infinity, 2**70, text) is one sentence, never an overflow deep in torch.
"""

from __future__ import annotations

import math
import secrets

from .errors import UserInputError

MAX_SEED = 2**32 - 1


def resolve_seed(seed, randomize: bool = False) -> int:
    """The seed to use: `seed` checked, or a fresh random one for None, a negative seed or
    `randomize`."""
    if randomize or seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, str):
        try:
            seed = float(seed.strip())
        except ValueError:
            raise UserInputError(f"The seed must be a whole number, not {seed!r}.") from None
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or not math.isfinite(seed) or seed != int(seed):
        raise UserInputError(f"The seed must be a whole number from 0 to {MAX_SEED} (or -1 for a random one), "
                             f"not {seed!r}.")
    seed = int(seed)
    if seed < 0:
        return secrets.randbelow(2**31)
    if seed > MAX_SEED:
        raise UserInputError(f"The seed must be at most {MAX_SEED} (or -1 for a random one), not {seed}.")
    return seed
