"""The vision tower's own attention per visual token, for methods that rank before the language model.

A forward pre-hook on the self-attention of the tower's feature layer (the layer whose output the projector
reads) recomputes that layer's attention probabilities from its input: eager, SDPA and FlashAttention towers
alike, no `output_attentions`. A token's score is the attention it receives from the CLS token (CLIP), or
its mean over all query tokens (towers without CLS, such as SigLIP). Which module, whether there is a CLS
token and whether the features leave it out comes from the family's adapter (`vision_attention`).

A method registered with `vision_layers` (VScan) reads several tower layers instead: its scores are
`[tokens, len(vision_layers) + 1]`, one column per layer in that order, then each token's patch index in its
image (0 starts an image), so that the method can tell images and their grids apart. Methods that also compare
the tower's features (VisPruner) get what the projector reads, from a pre-hook on the projector.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from pyramiddrop.scoring import VISION_ATTENTION_SCORERS, VISION_FEATURE_SCORERS, VISION_LAYERS


@dataclass
class VisionAttentionSpec:
    attention: nn.Module  # q_proj, k_proj, num_heads, head_dim (and scale) of the feature layer
    has_cls: bool  # token 0 of every image is a CLS token
    drop_cls: bool  # the image features leave token 0 out ("default" feature strategy)
    tower_attentions: tuple[nn.Module, ...] = ()  # every layer's self-attention, in order (`vision_layers`)
    projector: nn.Module | None = None  # reads the image features ([images, patches, width]) as its first input
    feature_layer: int | list[int] | None = None  # the config's vision_feature_layer


def llava_vision_attention(model: nn.Module) -> VisionAttentionSpec:
    """LLaVA-1.5: one feature layer of a CLIP or SigLIP tower; every patch becomes one image token."""
    config = model.config
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # SigLIP wraps its transformer, CLIP (5.x) does not
    layers = tower.encoder.layers
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):  # several layers concatenated: rank by the deepest
        feature_layer = max(layer % (len(layers) + 1) for layer in feature_layer)
    produced_by = feature_layer % (len(layers) + 1) - 1  # hidden_states[i] is the output of layer i - 1
    if produced_by < 0:
        raise ValueError(
            "method 'visionzip' reads the attention of the vision layer that produces the image features; "
            f"vision_feature_layer={config.vision_feature_layer} is the embedding output, which has none."
        )
    has_cls = hasattr(tower.embeddings, "class_embedding")
    drop_cls = has_cls and config.vision_feature_select_strategy == "default"
    every = tuple(layer.self_attn for layer in layers)
    return VisionAttentionSpec(
        layers[produced_by].self_attn,
        has_cls,
        drop_cls,
        tower_attentions=every,
        projector=model.model.multi_modal_projector,
        feature_layer=config.vision_feature_layer,
    )


class VisionAttentionCapture:
    """Collects one score per image feature token, image by image, during the tower's forward."""

    def __init__(self, spec: VisionAttentionSpec, layers: tuple[int, ...] | None = None) -> None:
        self.spec = spec
        self.several = layers is not None  # scores per listed layer plus the patch index (`vision_layers`)
        self.modules = [spec.attention] if layers is None else [spec.tower_attentions[i] for i in layers]
        self._scores: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self._features: list[torch.Tensor] = []
        self._consumed = False  # the next tower run starts new lists
        self._handles: list = []
        self.with_features = False

    @classmethod
    def for_method(cls, model: nn.Module, method: str, adapter) -> VisionAttentionCapture | None:
        """A capture if `method` ranks by the vision tower's attention, else None (an apply-time check)."""
        if method not in VISION_ATTENTION_SCORERS:
            return None
        if adapter.vision_attention is None:
            raise ValueError(
                f"method {method!r} ranks by the vision tower's attention per image token, which PyramidDrop maps "
                f"for LLaVA-1.5-style towers (one image token per patch), not for {adapter.family} models; choose "
                "another method (e.g. 'divprune' before the first layer)."
            )
        spec, layers = adapter.vision_attention(model), VISION_LAYERS.get(method)
        depth = len(spec.tower_attentions)
        if layers is not None and not all(-depth <= layer < depth for layer in layers):
            raise ValueError(
                f"method {method!r} reads the attention of vision layers {list(layers)} (as its release does), but "
                f"this vision tower has {depth} layers; use a model whose tower has at least "
                f"{max(max(layers) + 1, -min(layers))}."
            )
        capture = cls(spec, layers)
        if method in VISION_FEATURE_SCORERS:
            _check_cls_features(capture.spec, method)
            capture.with_features = True
        return capture

    def attach(self) -> None:
        self._handles = [
            module.register_forward_pre_hook(functools.partial(self._on_attention, index), with_kwargs=True)
            for index, module in enumerate(self.modules)
        ]
        if self.with_features:
            self._handles.append(self.spec.projector.register_forward_pre_hook(self._on_features, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scores (`[total tokens]`; `vision_layers`: `[total tokens, columns]`) and, for methods that read them,
        the features (`[images, patches, width]`) of every image of the tower's last run in feature order, or None.

        They stay until the tower runs again: `generate` encodes the images once, before its first forward, and
        every prefill of the call (one per step with `use_cache=False`) ranks with them.
        """
        self._consumed = True
        features = torch.cat(self._features) if self._features else None
        if not self._scores[0]:
            return None, features
        columns = [torch.cat([s.flatten() for s in scores]) for scores in self._scores]
        if not self.several:
            return columns[0], features
        patch = [torch.arange(s.shape[1], device=s.device).expand_as(s).flatten() for s in self._scores[0]]
        return torch.stack([*columns, torch.cat(patch).float()], dim=-1), features

    def _on_features(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        features = args[0] if args else kwargs["image_features"]
        self._features.append(features.detach())

    def _on_attention(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._consumed:
            self._scores, self._features, self._consumed = [[] for _ in self.modules], [], False
        with torch.no_grad():
            batch, length, _ = hidden.shape
            heads, head_dim = module.num_heads, module.head_dim
            query = module.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2).float()
            key = module.k_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2).float()
            if self.spec.has_cls:
                query = query[:, :, :1]
            scale = getattr(module, "scale", head_dim**-0.5)
            probs = (query @ key.transpose(-1, -2) * scale).softmax(dim=-1).mean(dim=1)  # [images, Q, L]
            scores = probs.mean(dim=1)  # [images, L]
            self._scores[index].append(scores[:, 1:] if self.spec.drop_cls else scores)


def _check_cls_features(spec: VisionAttentionSpec, method: str) -> None:
    """Apply-time refusals of a method that ranks by the CLS row and compares the features of the same layer."""
    if not spec.has_cls:
        raise ValueError(
            f"method {method!r} ranks by the attention of the vision tower's CLS token (as its release does for CLIP); "
            "this tower has no CLS token (e.g. SigLIP): choose another method (e.g. 'visionzip' or 'divprune')."
        )
    if not spec.drop_cls:
        raise ValueError(
            f"method {method!r} ranks the patch tokens by the CLS row, as its release does with LLaVA's 'default' "
            "feature strategy (CLS left out); set vision_feature_select_strategy='default' or choose another method."
        )
    if not isinstance(spec.feature_layer, int) or spec.feature_layer >= 0:
        raise ValueError(
            f"method {method!r} reads the attention of the layer that produces the image features, which its release "
            "does for one negative vision_feature_layer (LLaVA's -2); got "
            f"vision_feature_layer={spec.feature_layer}."
        )
