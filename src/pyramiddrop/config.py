"""`PyramidDropConfig`: where to drop visual tokens and how many to keep.

Field names follow the official PyramidDrop flags (`layer_list`, `image_token_ratio_list`) so that users of
the reference code can switch without translating their settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pyramiddrop.methods import REFUSED, SCORER_NAMES

POSITION_MODES = ("compact", "original")
QUERY_MODES = ("last", "instruction_mean")
VIDEO_POOLS = ("sample", "frame")
CONVERSATION_MODES = ("keep", "rerank")
# The scorers `pyramiddrop.scoring` registers, by name only (from the methods table): the command line checks
# `--method` and `--baselines` against them without importing torch.
BUILTIN_METHODS = SCORER_NAMES
# SparseVLM's release (Gumpest/SparseVLMs v1.5, `score.py`, `pruning_loc`): for LLaVA-1.5's 576 visual tokens, the
# visual tokens kept after its pruning layers 2, 6 and 15 (0-based) at each budget it reports.
SPARSEVLM_RETAINED_TOKENS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
SPARSEVLM_LAYERS = (3, 7, 16)  # layer_list: the drops after the pruning layers
SPARSEVLM_VISUAL_TOKENS = 576


@dataclass
class PyramidDropConfig:
    """How PyramidDrop splits the language model into stages and how many visual tokens each stage keeps.

    Args:
        layer_list: 1-based layer counts after which rank-and-drop runs. `[8, 16, 24]` on a 32-layer model
            drops before the 0-based layers 8, 16 and 24, giving 4 stages of 8 layers. `0` drops before the
            first decoder layer (a pre-LLM stage: no layer sees the dropped tokens, as in DivPrune or VisionZip).
        image_token_ratio_list: cumulative fraction of each sample's ORIGINAL visual-token count kept from
            the matching drop on (strictly decreasing, in (0, 1]). A sample with `N` visual tokens keeps
            `max(1, int(N * ratio))` of them: at least one token always survives so that a stage never
            loses its image entirely.
        position_mode: `"compact"` (the reference: positions are renumbered without gaps after each drop,
            and decoding continues each stage's own numbering) or `"original"` (kept tokens keep their
            original positions, as in FastV and most later work).
        method: name of the token-scoring function (see `pyramiddrop.scoring.SCORERS`).
        query: which prompt tokens rank the visual tokens at inference: `"last"` (the paper: the last prompt
            token) or `"instruction_mean"` (the mean over all text tokens after the last visual token).
            In training mode with labels, the tokens right before each answer span are used instead.
        seed: seed of stochastic scorers (e.g. `"random"`).
        video_pool: how video tokens are ranked. `"sample"` (default): all visual tokens of a sample (every
            frame of every video, and its images) form one pool, so frames the query ignores may lose all their
            tokens. `"frame"`: every video frame is ranked on its own and keeps the same fraction
            (`int(n_frame * ratio)`, at least 1), so no frame vanishes; a sample's images still form one pool.
            Models without video ignore it.
        conversation: what a follow-up turn (`generate` continuing from a returned cache) sees. `"keep"`
            (default): the first prefill's kept tokens, ranked by the first question. `"rerank"`: the new
            turn's last token ranks all visual tokens again, as a fresh prefill of the whole conversation would;
            the layers before the first drop keep their cache, the later ones are recomputed (the hidden
            states entering the first dropping layer are stored for that: batch x length x width floats).
    """

    layer_list: list[int] = field(default_factory=list)
    image_token_ratio_list: list[float] = field(default_factory=list)
    position_mode: str = "compact"
    method: str = "pdrop"
    query: str = "last"
    seed: int = 0
    video_pool: str = "sample"
    conversation: str = "keep"

    def __post_init__(self) -> None:
        self.layer_list = [_as_int(v, "layer_list") for v in self.layer_list]
        self.image_token_ratio_list = [float(v) for v in self.image_token_ratio_list]
        if len(self.layer_list) != len(self.image_token_ratio_list):
            raise ValueError(
                f"layer_list has {len(self.layer_list)} entries but image_token_ratio_list has "
                f"{len(self.image_token_ratio_list)}; give one keep ratio per drop layer."
            )
        for previous, current in zip(self.layer_list, self.layer_list[1:]):
            if current <= previous:
                raise ValueError(f"layer_list must be strictly increasing, got {self.layer_list}.")
        if self.layer_list and self.layer_list[0] < 0:
            raise ValueError(
                f"layer_list entries count layers (1-based; 0 = before the first layer) and must be >= 0, got "
                f"{self.layer_list[0]}."
            )
        for ratio in self.image_token_ratio_list:
            if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
                raise ValueError(
                    f"image_token_ratio_list entries must be in (0, 1], got {ratio} in {self.image_token_ratio_list}."
                )
        for previous, current in zip(self.image_token_ratio_list, self.image_token_ratio_list[1:]):
            if current >= previous:
                raise ValueError(
                    "image_token_ratio_list must be strictly decreasing (each ratio is a fraction of the "
                    f"original visual tokens), got {self.image_token_ratio_list}."
                )
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}.")
        if self.query not in QUERY_MODES:
            raise ValueError(f"query must be one of {QUERY_MODES}, got {self.query!r}.")
        if self.video_pool not in VIDEO_POOLS:
            raise ValueError(f"video_pool must be one of {VIDEO_POOLS}, got {self.video_pool!r}.")
        if self.conversation not in CONVERSATION_MODES:
            raise ValueError(f"conversation must be one of {CONVERSATION_MODES}, got {self.conversation!r}.")
        from pyramiddrop.scoring import SCORER_CHECKS, SCORERS  # local import: scoring imports nothing from here

        if self.method in REFUSED:
            raise ValueError(REFUSED[self.method])
        if self.method not in SCORERS:
            raise ValueError(f"method must be one of {sorted(SCORERS)}, got {self.method!r}.")
        if self.method in SCORER_CHECKS:
            SCORER_CHECKS[self.method](self)

    @classmethod
    def from_lambda(cls, num_layers: int, num_stages: int = 4, lam: float = 0.5, **kwargs: Any) -> PyramidDropConfig:
        """The paper's parametrisation: `num_stages` equal stages, stage `s` keeps `lam**s` of the tokens."""
        num_layers, num_stages = _as_int(num_layers, "num_layers"), _as_int(num_stages, "num_stages")
        if not 1 <= num_stages <= num_layers:
            raise ValueError(f"num_stages must be in [1, num_layers={num_layers}], got {num_stages}.")
        if not 0.0 < lam < 1.0:
            raise ValueError(f"lam must be in (0, 1), got {lam}.")
        layer_list = [round(num_layers * stage / num_stages) for stage in range(1, num_stages)]
        ratios = [lam**stage for stage in range(1, num_stages)]
        return cls(layer_list=layer_list, image_token_ratio_list=ratios, **kwargs)

    @classmethod
    def fastv(cls, k: int = 2, keep_ratio: float = 0.5, **kwargs: Any) -> PyramidDropConfig:
        """FastV as released: one drop before layer `k` (FastV's K), ranked with layer K-1's attention, keeping
        `keep_ratio` of the visual tokens (1 - FastV's R) at their original positions."""
        return cls([k], [keep_ratio], method="fastv", position_mode="original", **kwargs)

    @classmethod
    def dart(cls, k: int = 2, keep_ratio: float = 0.5, **kwargs: Any) -> PyramidDropConfig:
        """DART as released: one drop before layer `k` (its pruned_layer), pivots by layer K-1's keys, duplication
        measured on layer K-1's output, keeping `keep_ratio` of the visual tokens at their original positions."""
        return cls([k], [keep_ratio], method="dart", position_mode="original", **kwargs)

    @classmethod
    def sparsevlm(cls, retained_tokens: int = 192, recycle: bool = True, **kwargs: Any) -> PyramidDropConfig:
        """SparseVLM's released schedule for LLaVA-1.5 (576 visual tokens, 32 layers) at its budget `retained_tokens`
        (192, 128 or 64): drops after layers 3, 7 and 16 keeping its table's counts (plus the recycled tokens),
        ranked by its text raters in the layer before each drop; `recycle=False`: `sparsevlm-norecycle`."""
        if retained_tokens not in SPARSEVLM_RETAINED_TOKENS:
            raise ValueError(
                f"SparseVLM's release has schedules for retained_tokens in {sorted(SPARSEVLM_RETAINED_TOKENS)}, got "
                f"{retained_tokens!r}; for other counts give layer_list and image_token_ratio_list with "
                "method='sparsevlm'."
            )
        ratios = [count / SPARSEVLM_VISUAL_TOKENS for count in SPARSEVLM_RETAINED_TOKENS[retained_tokens]]
        method = "sparsevlm" if recycle else "sparsevlm-norecycle"
        return cls(list(SPARSEVLM_LAYERS), ratios, method=method, **kwargs)

    @classmethod
    def dycoke_ttm(cls, k: float = 0.7, **kwargs: Any) -> PyramidDropConfig:
        """DyCoke's temporal token merging as released (not its decode-time KV pruning): before the language model,
        in windows of 4 video frames, frames 1-3 keep the `int((1 - k) * T)` tokens least similar to an earlier frame
        (`k`: the release's `dycoke_k`, 0.7 in its evaluation); one ranking group per frame."""
        if not 0.0 <= k < 1.0:
            raise ValueError(f"k (DyCoke's dycoke_k, the pruned share of a compared frame) must be in [0, 1), got {k}.")
        return cls([0], [1 - k], method="dycoke-ttm", video_pool="frame", **kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.layer_list) + 1

    def keep_ratio(self, stage: int) -> float:
        """Cumulative kept fraction of stage `stage` (stage 0 keeps everything)."""
        return 1.0 if stage == 0 else self.image_token_ratio_list[stage - 1]

    def validate_for(self, num_layers: int) -> None:
        """Apply-time check against the model's depth: a drop needs a layer after it."""
        for value in self.layer_list:
            if not 0 <= value <= num_layers - 1:
                raise ValueError(
                    f"layer_list entry {value} is outside [0, {num_layers - 1}] for a language model with "
                    f"{num_layers} decoder layers (a drop after layer l needs a layer l+1 to rank with; 0 drops "
                    "before the first layer)."
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PyramidDropConfig:
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        """Write the config as a JSON object (what `pdrop tune` saves and `pdrop eval --schedule` reads)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> PyramidDropConfig:
        """The config saved by `to_json` (e.g. `pdrop tune`'s schedule.json); errors name the file and the key."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error}); give a file written by pdrop tune or to_json.") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object of PyramidDropConfig fields.")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {unknown}; a schedule holds {[f.name for f in fields(cls)]} (layer_list and "
                "image_token_ratio_list at least)."
            )
        return cls.from_dict(data)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(f"{name} must hold integers, got {value!r}.")
    return int(value)
