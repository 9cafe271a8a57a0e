"""The decode loop's rules for slots and steps, as pure functions over token lists and slot numbers.

:class:`workers.decode_loop.DecodeLoop` owns the llama.cpp context and calls these to decide which slot a new
sequence takes, whether to copy another slot's KV stream first, and which idle slots get a throwaway token in a
step.  Kept apart from the loop so the rules are tested without a model (tests/unit/test_slots.py).
"""

from __future__ import annotations

from collections.abc import Container, Sequence

# Copying another slot's KV stream (all num_ctx cells of it) pays for itself when the prefix it brings is at
# least this long: measured on 2 CPU cores with SmolLM2 and num_ctx 4096, copying a stream costs 6 ms, as much
# as prefilling 5 tokens; asking for 16 and 1 token per 256 cells of context keeps a margin at any size.
MIN_COPY_TOKENS = 16
COPY_CTX_PER_TOKEN = 256
# The widest run of idle slots a step fills with throwaway tokens.  llama.cpp makes one pass over the weights
# per run of consecutive sequence ids; measured on 2 CPU cores (bench/cpu_weights.py) a step costs about 6 ms
# plus 1.5-2 ms per token, so filling pays for gaps up to this wide.
MAX_GAP_FILL = 2


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pick_slot(free: Sequence[int], cached: Sequence[Sequence[int]], prompt: Sequence[int]) -> int:
    """The free slot whose cached tokens share the longest prefix with ``prompt``; on a tie (no shared prefix,
    say) the lowest, which keeps the busy slots one consecutive run."""
    return max(free, key=lambda s: (common_prefix(cached[s], prompt), -s))


def donor(slot: int, cached: Sequence[Sequence[int]], prompt: Sequence[int]) -> tuple[int, int]:
    """The other slot whose cached tokens share the longest prefix with ``prompt``, and how long it is
    (``(-1, 0)`` when none shares any)."""
    best, length = -1, 0
    for other, tokens in enumerate(cached):
        if other != slot and tokens:
            shared = common_prefix(tokens, prompt)
            if shared > length:
                best, length = other, shared
    return best, length


def worth_copying(gain: int, n_ctx: int) -> bool:
    """Whether a donor's stream that brings ``gain`` more cached tokens than the slot's own is worth its copy."""
    return gain >= max(MIN_COPY_TOKENS, n_ctx // COPY_CTX_PER_TOKEN)


def gap_fillers(slots: Sequence[int], room: int, busy: Container[int]) -> list[int]:
    """Idle slots worth one throwaway token each so that a step's sequences (``slots``, ascending) form one
    consecutive run: gaps of at most :data:`MAX_GAP_FILL` idle slots, while ``room`` tokens are left in the
    step, and never a slot that is ``busy`` with a sequence of its own."""
    fillers: list[int] = []
    for low, high in zip(slots, slots[1:]):
        gap = list(range(low + 1, high))
        if gap and len(gap) <= MAX_GAP_FILL and len(fillers) + len(gap) <= room:
            if not any(s in busy for s in gap):
                fillers.extend(gap)
    return fillers
