"""Stage-cache bookkeeping: which slots each stage's cache layers hold, and whether a call can continue them.

After a prefill, layers of later stages cache only the kept tokens. Every later call (a decode step, assisted
decoding's candidates, a follow-up turn) appends the same new tokens to every stage; assisted decoding may crop
rejected candidates, which transformers does by input-coordinate length and therefore misses deeper layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch


def cache_argument(kwargs: dict):
    """The KV cache a module was called with: `cache=` since transformers 5.24, `past_key_values=` before."""
    return kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")


@dataclass
class StageSlots:
    """Per stage, the padding mask over the slots its cache layers hold: the prefill's kept tokens, then every
    token appended since. `length` is the same count in input coordinates (stage 0)."""

    slots: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    cache: weakref.ref | None = None  # the cache the last prefill filled

    def start(self, masks: list[torch.Tensor]) -> None:
        """After a prefill (or a re-ranking call): each stage holds its kept tokens."""
        self.slots = list(masks)

    def remember(self, cache) -> None:
        self.cache = weakref.ref(cache) if cache is not None else None

    def append(self, new_mask: torch.Tensor) -> None:
        self.slots = [torch.cat([slots, new_mask], dim=1) for slots in self.slots]
        self.length += new_mask.shape[1]

    def past_length(self, cache, attention_mask: torch.Tensor | None, length: int, drops_before_first: bool) -> int:
        """Tokens already in the cache, in input coordinates. A layer before the first drop holds all of them;
        with a drop before layer 0 every layer holds fewer, and the padding mask (cache plus new tokens) tells."""
        if cache is None:
            return 0
        held = cache.get_seq_length()
        if held == 0 or not drops_before_first:
            return held
        return attention_mask.shape[-1] - length if attention_mask is not None else self.length

    def check_continuation(self, cache, past: int, visual_slots: torch.Tensor, stage_of_layer: list[int]) -> None:
        """Refuse what the stage tables cannot extend; match them to the cache after a crop.

        `visual_slots`: stage 0's droppable visual tokens (a crop into them needs a new prefill).
        """
        if self.cache is None or self.cache() is not cache:
            raise ValueError(
                "PyramidDrop can only continue from the cache its own last prefill on this model filled (deeper "
                "layers hold only the kept tokens); start from an empty cache, or continue the latest conversation."
            )
        if past > self.length:
            raise ValueError(f"the cache holds {past} tokens but PyramidDrop only saw {self.length} go in.")
        if past < self.length:  # cropped (assisted decoding's rejected candidates): every stage loses the same tail
            cut = self.length - past
            if bool(visual_slots[:, past:].any()):
                raise ValueError("the cache was cropped into the visual tokens; PyramidDrop needs a new prefill.")
            self.slots = [slots[:, :-cut] for slots in self.slots]
            self.length = past
        for layer_index, stage_index in enumerate(stage_of_layer):  # a DynamicCache: one layer object each
            expected = self.slots[stage_index].shape[1]
            held = cache.get_seq_length(layer_index)
            if held > expected:  # a crop by input-coordinate length misses deeper layers
                cache.layers[layer_index].crop(expected - held)
            elif held != expected:
                raise ValueError(
                    f"decoder layer {layer_index}'s cache holds {held} tokens, PyramidDrop expects {expected}."
                )
