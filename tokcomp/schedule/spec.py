"""The shape of a model as far as schedules and MACs go: ModelSpec for a vision encoder,
VLMSpec for a vision-language model. Adapters build them; they describe geometry only."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from tokcomp.methods import Geometry
from tokcomp.methods.visual import ProjectorForm, VisualGeometry

#: Text tokens of the reference prompt a VLM's MACs are counted for.
REFERENCE_PROMPT = 40


@dataclass(frozen=True)
class ModelSpec(Geometry):
    """A vision encoder's shape. family is the name of the adapter that patches it ("timm",
    "open_clip", "hf_vision", "hf_vlm");
    name the architecture; mlp_hidden the MLP hidden width; stem_macs and head_macs the MACs
    outside the blocks (patch embedding, classifier or pooling head), the head's at the
    unpruned token count; head_token_macs the part of head_macs per token the head pools over
    (an attention pool's keys and values), paid only for the tokens that reach it."""

    family: str
    name: str
    mlp_hidden: int
    stem_macs: int
    head_macs: int
    head_token_macs: int = field(default=0, kw_only=True)

    #: Fields a saved config must match besides Config's common ones (subclasses add theirs).
    checked: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return {name: _plain(value) for name, value in asdict(self).items()}

    @property
    def label(self) -> str:
        """How error messages name this model."""
        return self.name


def _plain(value: Any) -> Any:
    """`value` as JSON and YAML write it back: enums by value, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class VLMSpec(ModelSpec):
    """A VLM's shape. The ModelSpec fields describe the vision tower (per crop); the others the
    rest, for one reference image and a REFERENCE_PROMPT-token text.

    crops: tower passes per image. visual_tokens: visual tokens per image reaching the language
    model unpruned, of which fixed_visual are always kept (image-newline); segments: the sizes
    of the groups the others are chosen in (one per crop, or the whole image). projected_tokens:
    tokens through the projector per image; projector_widths: its layers' widths, input first
    (features) and output last (the language model's width); projector_form: its shape.
    llm_*: decoder layers, linear MACs per token per layer (q/k/v/o with GQA widths, gated MLP),
    query width (heads x head_dim) and key width (kv heads x head_dim); lm_head_macs: one
    token's logits. feature_block / feature_prefix: the tower
    block whose output the projector takes and the tokens dropped in front of it (for block
    methods inside the tower, which tower_methods allows). tower_unmerge: whether a merging
    block method can run inside the tower with unmerge, beside a visual-token method (the tower
    is one tokcomp's hf_vision adapter patches). tower_attention: whether the adapter
    gives methods the tower's attention and keys at that layer. takes_videos: whether tokcomp
    gives the model videos (and methods their frames); frames: the frames the reference item
    spans (1: the reference is an image; Qwen's temporal patches), for per-frame budgets;
    video: whether the reference is a video (`config_of(model, frames=N)`), one frame or more.
    text_visual: of the fixed visual tokens, those that are text tokens of the prompt rather
    than image placeholders (Mistral 3's image-break and image-end tokens): in-LLM methods
    that read text rows read theirs too. unprojected_segments: the segments whose tokens are
    chosen among pooled projector outputs (LLaVA-OneVision's videos and pooled crops): their
    choice sees an identity projector.
    """

    architecture: str
    crops: int
    visual_tokens: int
    fixed_visual: int
    segments: tuple[int, ...]
    projected_tokens: int
    projector_widths: tuple[int, ...]
    projector_form: ProjectorForm
    prompt_tokens: int
    llm_depth: int
    llm_token_macs: int
    llm_attn_dim: int
    llm_kv_dim: int
    lm_head_macs: int
    feature_block: int
    feature_prefix: int
    tower_methods: bool
    tower_attention: bool
    takes_videos: bool = False
    frames: int = 1
    video: bool = False
    text_visual: int = 0
    unprojected_segments: tuple[int, ...] = ()
    tower_unmerge: bool = False

    checked: ClassVar[tuple[str, ...]] = (
        "architecture",
        "crops",
        "visual_tokens",
        "llm_depth",
        "llm_token_macs",
        "llm_attn_dim",
        "lm_head_macs",
        "projector_widths",
    )

    @property
    def selectable(self) -> int:
        """Visual tokens of the reference image a method chooses from."""
        return self.visual_tokens - self.fixed_visual

    @property
    def visual_geometry(self) -> VisualGeometry:
        """What visual-token methods' costs depend on."""
        return VisualGeometry(
            self.projector_widths, self.projector_form, self.head_dim, self.frames
        )

    def segment_geometry(self, segment: int) -> VisualGeometry:
        """What choosing in segment `segment` costs depends on: the projector the segment's
        tokens are chosen before, an identity one (no MACs) for pooled projector outputs."""
        geometry = self.visual_geometry
        if segment not in self.unprojected_segments:
            return geometry
        identity = (geometry.output_width,)
        return replace(geometry, projector_widths=identity, projector_form=ProjectorForm.OTHER)

    def tower(self) -> ModelSpec:
        """The vision tower alone, as the hf_vision adapter describes it."""
        names = [f.name for f in fields(ModelSpec)]
        return ModelSpec(**{**{n: getattr(self, n) for n in names}, "family": "hf_vision"})

    @property
    def label(self) -> str:
        return self.architecture
