"""Each method's own work in the analytic MACs, against torch's FLOP counter (reference ops,
math attention): the total per image, and the selection alone, measured as the difference to
a run that selects for free at the same token counts (random pruning at the same schedule or
budget; for FastV, the unpatched model against FastV keeping every token)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers as hf
from conftest import tiny_vit
from fixtures.clip import save_prompt_tokenizer, save_tiny_clip
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from vlm_fixtures import (
    BOS,
    FAMILIES,
    IMAGE,
    IMAGE_BREAK,
    IMAGE_END,
    TEXT_HIGH,
    TEXT_LOW,
    VIDEO,
    VISION_END,
    VISION_START,
    collate,
    sample,
)
from vlm_fixtures import tiny_vlm as _tiny_vlm

import tokcomp
from tokcomp.adapters.hf_vlm.families import family_for
from tokcomp.adapters.hf_vlm.families.base import REFERENCE_PIXELS
from tokcomp.methods import Stage, create_method, method_class
from tokcomp.methods.cdpruner import load_clip
from tokcomp.methods.visual import ProjectorForm, VisualGeometry, VisualSignal, VisualTokens
from tokcomp.schedule import REFERENCE_PROMPT

#: How close the analytic MACs must be to the counted ones.
REL = 0.05

#: Options per block method on the encoders below: budgets where each method's own work is
#: visible (257 tokens of width 16: token-pair work is large next to the linear layers).
BLOCK_OPTIONS = {
    "tome": {"r": 64},
    "pitome": {"keep_ratio": 0.75},
    "diffrate": {"prune_kept": [257] * 4, "merge_kept": [257, 129, 65, 33]},
    "zero_tprune": {"keep_ratio": 0.7},
    "evit": {"keep_ratio": 0.7},
    "random": {"keep_ratio": 0.7},
}
#: Options per visual-token method (half of each image's visual tokens).
VISUAL_OPTIONS = {
    "zoo": {"keep": 0.5},
    "divprune": {"keep": 0.5},
    "cdpruner": {"keep": 0.5},
    "fastv": {"keep": 0.5},
    "fastervlm": {"keep": 0.5},
    "visionzip": {"keep": 0.5},
    "vispruner": {"keep": 0.5},
    "pyramiddrop": {"keep": 0.5},
    "dart": {"keep": 0.5},
    "sparsevlm": {"keep": 0.5},
    "dycoke": {"k": 0.5, "decode_layer": 2},  # the tiny models have 3 layers
    "random": {"keep_ratio": 0.5},
    "fastvid": {"keep": 0.5, "context": 0.5},
}
#: The methods that run on images of models that take no videos (FastVID and DyCoke need
#: frames; DyCoke's cases are VIDEO_CASES).
IMAGE_OPTIONS = [
    m for m in VISUAL_OPTIONS if VisualSignal.FRAMES not in method_class(m).visual_needs
]
#: (family, method, extra options): every method on LLaVA-1.5, LLaVA-NeXT(-Video), LLaVA-OneVision
#: (crops, each a segment with its share), Gemma 3 (pooled tokens), Mistral 3 (merged
#: patches, image-break tokens) and Qwen3-VL (merged patches, deepstack mergers), those without
#: tower signals on SmolVLM (a single-Linear projector), and ZOO's sketch. FastVID only where
#: the model takes videos (an image a one-frame video).
VISUAL_CASES = [
    *[pytest.param("llava", method, {}, id=f"llava-{method}") for method in IMAGE_OPTIONS],
    *[pytest.param("llava_next", m, {}, id=f"llava_next-{m}") for m in IMAGE_OPTIONS],
    *[
        pytest.param("llava_next_video", m, {}, id=f"llava_next_video-{m}")
        for m in [*IMAGE_OPTIONS, "fastvid"]
    ],
    *[
        pytest.param("llava_onevision", m, {}, id=f"llava_onevision-{m}")
        for m in [*IMAGE_OPTIONS, "fastvid"]  # an image there is a one-frame video to FastVID
    ],
    *[pytest.param("gemma3", m, {}, id=f"gemma3-{m}") for m in IMAGE_OPTIONS],
    *[pytest.param("mistral3", m, {}, id=f"mistral3-{m}") for m in IMAGE_OPTIONS],
    *[pytest.param("qwen3_vl", m, {}, id=f"qwen3_vl-{m}") for m in IMAGE_OPTIONS],
    *[
        pytest.param("smolvlm", method, {}, id=f"smolvlm-{method}")
        for method in (
            "zoo",
            "divprune",
            "cdpruner",
            "fastv",
            "pyramiddrop",
            "dart",
            "sparsevlm",
            "random",
        )
    ],
    pytest.param("llava", "zoo", {"sketch": 8}, id="llava-zoo-sketch"),
]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch):
    """The compiled ops are invisible to the FLOP counter: count the PyTorch references."""
    monkeypatch.setenv("TOKCOMP_BACKEND", "reference")


def tiny_vlm(family: str) -> nn.Module:
    """The tiny VLM of `family`; LLaVA-OneVision with the released anyres_max_9, under which
    the reference image's grid is not pooled (as on the released models)."""
    model = _tiny_vlm(family)
    if family == "llava_onevision":
        model.config.vision_aspect_ratio = "anyres_max_9"
    return model


def _counted(run: Callable[[], object]) -> float:
    """MACs torch counts for `run()` (FLOPs / 2), attention in its math form."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        run()
    return counter.get_total_flops() / 2


def test_every_registered_method_has_a_case():
    assert set(BLOCK_OPTIONS) == set(tokcomp.methods("vision"))
    assert set(VISUAL_OPTIONS) == set(tokcomp.methods("vlm"))


# -- block methods ------------------------------------------------------------------------------


def _encoder(family: str) -> nn.Module:
    """257 tokens of width 16: a timm ViT with one head, or a Hugging Face CLIP with two."""
    if family == "timm":
        return tiny_vit(img_size=64, embed_dim=16, num_heads=1)
    config = hf.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=64,
        patch_size=4,
    )
    torch.manual_seed(0)
    return hf.CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("family", ["timm", "hf_clip"])
@pytest.mark.parametrize("method", sorted(BLOCK_OPTIONS))
def test_block_method_macs_match_the_flop_counter(family, method):
    model = _encoder(family)
    images = torch.randn(1, 3, 64, 64)
    config = tokcomp.config_of(tokcomp.apply(model, method, **BLOCK_OPTIONS[method]))
    counted = _counted(lambda: model(images))
    tokcomp.apply(model, "random", schedule=config.schedule)
    free = _counted(lambda: model(images))
    assert config.macs == pytest.approx(counted, rel=REL)
    assert config.selection_macs == pytest.approx(counted - free, rel=REL)


@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune"])
def test_the_encoder_makes_the_selection_count(method):
    """Here these methods' own work is more than 5% of the total, so the total comparison
    above fails if the selection term is left out."""
    config = tokcomp.config_of(tokcomp.apply(_encoder("timm"), method, **BLOCK_OPTIONS[method]))
    assert config.selection_macs > REL * config.macs


def test_target_macs_lands_on_model_plus_selection():
    config = tokcomp.config_of(tokcomp.apply(_encoder("timm"), "pitome", target_macs=0.8))
    assert config.macs_ratio == pytest.approx(0.8, abs=0.005)
    assert (config.macs - config.selection_macs) / config.base_macs < 0.8 - REL


# -- visual-token methods -------------------------------------------------------------------------


def _prompt(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """One reference image and text of the reference length, so the analytic prefill applies."""
    if FAMILIES[family].kind == "llava_next" or family == "llava_next_video":
        return _next_prompt(model)
    if family in ("mistral3", "qwen3_vl"):
        return _native_prompt(model, family)
    first = sample(model, family, images=1, text=0, seed=0)
    text = len(first.input_ids) - int((first.input_ids == IMAGE).sum())
    return collate(family, [sample(model, family, 1, REFERENCE_PROMPT - text, seed=0)])


def _next_prompt(model: nn.Module) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT(-Video), LLaVA-OneVision: a REFERENCE_PIXELS square image (its crops) after
    one BOS token."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, size = model.config, torch.tensor([[REFERENCE_PIXELS, REFERENCE_PIXELS]])
    side = config.vision_config.image_size
    crops = image_size_to_num_patches(size[0], config.image_grid_pinpoints, side)
    pixels = torch.randn(1, crops, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        count = model.model.get_image_features(pixels, size).pooler_output[0].shape[0]
    text = torch.randint(TEXT_LOW, TEXT_HIGH, (REFERENCE_PROMPT - 1,))
    ids = torch.cat([torch.tensor([BOS]), torch.full((count,), IMAGE), text])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_sizes": size,
    }


def _native_prompt(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """Mistral 3, Qwen3-VL: a REFERENCE_PIXELS square image at its native size (Pixtral: its
    rows of tokens each closed by an image-break token, counted with the image; Qwen3-VL:
    between vision start and end tokens, counted with the text) in a REFERENCE_PROMPT-token
    text."""
    generator = torch.Generator().manual_seed(0)
    vision = model.config.vision_config
    merge = getattr(model.config, "spatial_merge_size", None) or vision.spatial_merge_size
    side = REFERENCE_PIXELS // vision.patch_size // merge * merge
    rows = side // merge
    if family == "mistral3":
        pixels = REFERENCE_PIXELS // vision.patch_size * vision.patch_size
        image = {
            "pixel_values": torch.randn(1, 3, pixels, pixels, generator=generator),
            "image_sizes": torch.tensor([[pixels, pixels]]),
        }
        tokens = torch.tensor(([IMAGE] * rows + [IMAGE_BREAK]) * rows)
        tokens[-1] = IMAGE_END
        text = REFERENCE_PROMPT - 1
    else:
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        image = {
            "pixel_values": torch.randn(side * side, width, generator=generator),
            "image_grid_thw": torch.tensor([[1, side, side]]),
        }
        tokens = torch.tensor([VISION_START, *[IMAGE] * rows * rows, VISION_END])
        text = REFERENCE_PROMPT - 3
    words = torch.randint(TEXT_LOW, TEXT_HIGH, (text,), generator=generator)
    ids = torch.cat([torch.tensor([BOS]), tokens, words])[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **image}
    if family == "qwen3_vl":
        batch["mm_token_type_ids"] = (ids == IMAGE).int()
    return batch


def _prefill(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """MACs counted for the prefill of `batch` (logits of its last token only)."""
    return _counted(lambda: model(**batch, logits_to_keep=1))


def _options(method: str, extra: dict) -> dict:
    return {**VISUAL_OPTIONS[method], **extra}


@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune"])
def test_block_method_in_the_llava_tower_matches_the_flop_counter(method):
    model = tiny_vlm("llava")
    batch = _prompt(model, "llava")
    options = {"r": 4} if method == "tome" else {"keep_ratio": 0.75}
    config = tokcomp.config_of(tokcomp.apply(model, method, **options))
    assert config.selection_macs > 0
    assert config.macs == pytest.approx(_prefill(model, batch), rel=REL)


@pytest.mark.parametrize(("family", "method", "extra"), VISUAL_CASES)
def test_visual_method_macs_match_the_flop_counter(family, method, extra):
    model = tiny_vlm(family)
    batch = _prompt(model, family)
    config = tokcomp.config_of(tokcomp.apply(model, method, **_options(method, extra)))
    assert config.macs == pytest.approx(_prefill(model, batch), rel=REL)


@pytest.mark.parametrize("method", [*IMAGE_OPTIONS, "fastvid"])
def test_choices_among_pooled_crops_pass_through_no_projector(method):
    """The tiny LLaVA-OneVision's own anyres_max pools the reference image's grid crops after
    the projector: ZOO's sensitivity there perturbs no projector (counted with one, +26%)."""
    model = _tiny_vlm("llava_onevision")
    batch = _prompt(model, "llava_onevision")
    config = tokcomp.config_of(tokcomp.apply(model, method, **VISUAL_OPTIONS[method]))
    assert config.model["unprojected_segments"] == list(range(1, config.model["crops"]))
    assert config.macs == pytest.approx(_prefill(model, batch), rel=REL)


@pytest.mark.parametrize(("family", "method", "extra"), VISUAL_CASES)
def test_visual_method_selection_matches_the_flop_counter(family, method, extra):
    model = tiny_vlm(family)
    batch = _prompt(model, family)
    options = _options(method, extra)
    llm_stage = method_class(method).stage is Stage.LLM
    if llm_stage:
        options["keep"] = 1.0  # the token counts of the unpatched model
    config = tokcomp.config_of(tokcomp.apply(model, method, **options))
    counted = _prefill(model, batch)
    if llm_stage:
        tokcomp.remove(model)
    else:
        tokcomp.apply(model, "random", keep_ratio=VISUAL_OPTIONS[method].get("keep", 0.5))
    assert config.selection_macs == pytest.approx(counted - _prefill(model, batch), rel=REL)


def _video_prompt(model: nn.Module, family: str, frames: int) -> dict[str, torch.Tensor]:
    """A video of `frames` frames (Qwen2-VL, Qwen3-VL: REFERENCE_PIXELS-square random patches,
    two frames per temporal patch; Qwen3-VL: each temporal patch its own run after a 3-token
    timestamp; LLaVA-OneVision, LLaVA-NeXT-Video: tower-sized frames, as many placeholders as
    get_video_features gives) and text of the reference length, the structural tokens counted
    with the text."""
    generator = torch.Generator().manual_seed(0)
    vision = model.config.vision_config
    if family.startswith("qwen"):
        merge = vision.spatial_merge_size
        side = REFERENCE_PIXELS // vision.patch_size // merge * merge
        grid = torch.tensor([[frames // vision.temporal_patch_size, side, side]])
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(int(grid.prod()), width, generator=generator)
        video = {"pixel_values_videos": pixels, "video_grid_thw": grid}
        runs = int(grid[0, 0]) if family == "qwen3_vl" else 1
        timestamp = [TEXT_LOW] * 3 if family == "qwen3_vl" else []
        run = [
            *timestamp,
            VISION_START,
            *[VIDEO] * (int(grid.prod()) // merge**2 // runs),
            VISION_END,
        ]
        tokens = torch.tensor(run * runs)
    else:
        side = vision.image_size
        pixels = torch.randn(1, frames, 3, side, side, generator=generator)
        with torch.no_grad():
            count = model.model.get_video_features(pixels).pooler_output[0].shape[0]
        video = {"pixel_values_videos": pixels}
        tokens = torch.tensor([VISION_START, *[VIDEO] * count, VISION_END])
    structural = 1 + int((tokens != VIDEO).sum())  # and the BOS token
    text = torch.randint(TEXT_LOW, TEXT_HIGH, (REFERENCE_PROMPT - structural,), generator=generator)
    ids = torch.cat([torch.tensor([BOS]), tokens, text])[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **video}
    if family.startswith("qwen"):
        batch["mm_token_type_ids"] = 2 * (ids == VIDEO).int()
    return batch


VIDEO_CASES = [
    *[
        pytest.param("qwen2_vl", m, 2, id=f"qwen2_vl-{m}")
        for m in VISUAL_OPTIONS
        if not method_class(m).visual_needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}
    ],
    *[pytest.param("qwen3_vl", m, 2, id=f"qwen3_vl-{m}") for m in VISUAL_OPTIONS],
    *[pytest.param("llava_onevision_video", m, 4, id=f"onevision-{m}") for m in VISUAL_OPTIONS],
    *[pytest.param("llava_next_video", m, 4, id=f"next_video-{m}") for m in VISUAL_OPTIONS],
]


@pytest.mark.parametrize(("family", "method", "passes"), VIDEO_CASES)
def test_visual_method_macs_on_a_video_match_the_flop_counter(family, method, passes):
    """Four frames: Qwen2-VL's or Qwen3-VL's two temporal patches or LLaVA-OneVision's or
    LLaVA-NeXT-Video's four frames, each a tower pass; a budget of the video's tokens."""
    model = tiny_vlm(family)
    batch = _video_prompt(model, family, frames=4)
    config = tokcomp.config_of(tokcomp.apply(model, method, **VISUAL_OPTIONS[method]), frames=4)
    assert config.model["crops"] == passes
    assert config.macs == pytest.approx(_prefill(model, batch), rel=REL)


def test_zoo_general_path_matches_the_flop_counter():
    """A projector with a normalisation inside: every perturbed row goes through it."""
    model = tiny_vlm("llava")
    projector = model.model.multi_modal_projector
    projector.act = nn.Sequential(projector.act, nn.LayerNorm(projector.linear_1.out_features))
    batch = _prompt(model, "llava")
    config = tokcomp.config_of(tokcomp.apply(model, "zoo", keep=0.5, directions=4))
    assert config.model["projector_form"] == "other"
    assert config.macs == pytest.approx(_prefill(model, batch), rel=REL)
    assert config.selection_macs > REL * config.macs


def test_zoo_selection_is_counted_in_the_total():
    """ZOO's sensitivity pass makes the count differ from the model's MACs by far more than 5%
    here: the total comparison above fails without the selection term."""
    config = tokcomp.config_of(tokcomp.apply(tiny_vlm("llava"), "zoo", keep=0.5))
    assert config.selection_macs > REL * config.macs


def test_visual_target_macs_picks_the_budget_nearest_in_model_plus_selection():
    model = tiny_vlm("llava")
    totals, models_only = {}, {}
    for keep in range(1, 17):
        config = tokcomp.config_of(tokcomp.apply(model, "zoo", keep=keep, directions=4))
        totals[keep] = config.macs_ratio
        models_only[keep] = (config.macs - config.selection_macs) / config.base_macs
    target = models_only[8]
    nearest = min(totals, key=lambda keep: abs(totals[keep] - target))
    assert nearest != 8  # the two MACs pick different budgets here
    config = tokcomp.config_of(tokcomp.apply(model, "zoo", target_macs=target, directions=4))
    assert config.options["keep"] == nearest


def test_configs_saved_before_selection_macs_load():
    config = tokcomp.config_of(tokcomp.apply(tiny_vit(), "tome", r=4))
    data = config.to_dict()
    del data["selection_macs"]
    loaded = tokcomp.Config.from_dict(data)
    assert loaded.selection_macs == 0 and loaded.macs == config.macs


SELECT_CASES = [
    *[pytest.param(method, VISUAL_OPTIONS[method], id=method) for method in VISUAL_OPTIONS],
    pytest.param("zoo", {"sketch": 4}, id="zoo-sketch"),
    pytest.param("visionzip", {"contextual": 0.5}, id="visionzip-half-contextual"),
    pytest.param("vispruner", {"important": 0.0}, id="vispruner-all-diverse"),
]


@pytest.mark.parametrize(("tokens", "keep"), [(40, 3), (40, 20), (33, 32)])
@pytest.mark.parametrize(("method", "options"), SELECT_CASES)
def test_select_macs_equal_the_flops_of_select(method, options, tokens, keep):
    """Each method's hook against the FLOPs of its `select` call alone for one image (an MLP
    projector; budgets with many rounds, contextual tokens or none)."""
    torch.manual_seed(0)
    projector = (nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 16))
    features = torch.randn(1, tokens, 12)
    with torch.no_grad():
        outputs = projector[2](projector[1](projector[0](features)))
    attention, keys = torch.rand(1, tokens), torch.randn(1, tokens, 8)
    text = {"text_keys": torch.randn(1, 6, 8), "text_states": torch.randn(1, 6, 16)}
    text["text_valid"] = torch.ones(1, 6, dtype=torch.bool)
    states = torch.randn(1, tokens, 16)  # an LLM-stage method's view of the tokens, as wide
    prompt_text = (torch.randn(5, 16),)  # the prompt's text tokens in the output space
    visual = VisualTokens(
        outputs, projector, features, attention, keys, states, text=prompt_text, **text
    )
    chosen = create_method(method, **options)
    geometry = VisualGeometry((12, 20, 16), ProjectorForm.MLP, key_width=8)
    counted = _counted(lambda: chosen.select(visual, keep))
    assert chosen.select_macs(geometry, tokens, keep) == counted


@pytest.mark.parametrize(("frames", "segments"), [(4, 8), (6, 3)])
def test_fastvid_select_macs_equal_the_flops_of_select_on_a_video(frames, segments):
    """Frames in pairs of near-equal global features, so that DySeg makes the fewest segments
    (min(c, frames), equal) the MACs model counts: anchors merge whole multi-frame segments."""
    torch.manual_seed(0)
    base = torch.randn(frames // 2, 1, 16).repeat_interleave(2, dim=0)
    outputs = (base * 4 + torch.randn(frames, 8, 16)).reshape(1, frames * 8, 16)
    visual = VisualTokens(outputs, (), attention=torch.rand(1, frames * 8), frames=frames)
    chosen = create_method("fastvid", segments=segments, tau=-1.0, context=0.5)
    geometry = VisualGeometry((16,), ProjectorForm.OTHER, key_width=8, frames=frames)
    counted = _counted(lambda: chosen.select(visual, frames * 4))
    assert counted > 0
    assert chosen.select_macs(geometry, frames * 8, frames * 4) == counted


@pytest.fixture(scope="module")
def clip_options(tmp_path_factory) -> dict[str, str]:
    """CDPruner's options for the released relevance on the tiny LLaVA: a tiny CLIP of its
    tower with CLIP's 77-token window (the reference prompt's text fits one, as counted)."""
    root = tmp_path_factory.mktemp("clip")
    clip = save_tiny_clip(root / "clip", tiny_vlm("llava").model.vision_tower, window=77)
    tokenizer = save_prompt_tokenizer(root / "prompt")
    return {"text_encoder": str(clip), "prompt_tokenizer": str(tokenizer)}


def test_cdpruner_clip_select_macs_equal_the_flops_of_select(clip_options):
    """Similarities, the patches through visual_projection, the text through CLIP's text tower."""
    tokens, keep = 40, 20
    method = create_method("cdpruner", keep=0.5, **clip_options)
    width = load_clip(clip_options["text_encoder"])[0].config.vision_config.hidden_size
    visual = VisualTokens(
        torch.randn(1, tokens, 16),
        (),
        features=torch.randn(1, tokens, width),
        prompt=(torch.tensor([5, 6, 7, 8]),),
    )
    geometry = VisualGeometry((width, 16), ProjectorForm.LINEAR, key_width=8)
    counted = _counted(lambda: method.select(visual, keep))
    assert method.select_macs(geometry, tokens, keep) == counted


def test_cdpruner_clip_macs_match_the_flop_counter(clip_options):
    model = tiny_vlm("llava")
    batch = _prompt(model, "llava")
    config = tokcomp.config_of(tokcomp.apply(model, "cdpruner", keep=0.5, **clip_options))
    counted = _prefill(model, batch)
    assert config.macs == pytest.approx(counted, rel=REL)
    tokcomp.apply(model, "random", keep_ratio=0.5)
    assert config.selection_macs == pytest.approx(counted - _prefill(model, batch), rel=REL)


# -- merging inside the tower, with unmerge ------------------------------------------------

#: (family, method, frames): a visual-token method beside ToMe merging in the tower, on the
#: reference image (frames None) or on a 4-frame video.
TOWER_CASES = [
    pytest.param("llava", "fastv", None, id="llava-fastv"),
    pytest.param("llava_onevision", "fastv", None, id="onevision-fastv"),
    pytest.param("llava_onevision", "visionzip", None, id="onevision-visionzip"),
    pytest.param("llava_onevision_video", "random", 4, id="onevision-video-random"),
    pytest.param("llava_onevision_video", "visionzip", 4, id="onevision-video-visionzip"),
    pytest.param("llava_onevision_video", "dycoke", 4, id="onevision-video-dycoke"),
]


@pytest.mark.parametrize(("family", "method", "frames"), TOWER_CASES)
def test_tower_merging_macs_match_the_flop_counter_within_one_percent(family, method, frames):
    """The tower at ToMe's merged counts (r=3 of 16 or 17 tokens per block), its matching
    counted as the method's own work, the rest of the prefill as the visual method alone:
    within 1% of the counted MACs, and below the visual method alone's model MACs."""
    model = tiny_vlm(family)
    batch = _prompt(model, family) if frames is None else _video_prompt(model, family, frames)
    tokcomp.apply(model, method, **VISUAL_OPTIONS[method])
    alone = tokcomp.config_of(model, frames=frames)
    tokcomp.apply(model, method, **VISUAL_OPTIONS[method], tower="tome", tower_options={"r": 3})
    config = tokcomp.config_of(model, frames=frames)
    assert config.macs == pytest.approx(_prefill(model, batch), rel=0.01)
    assert config.macs - config.selection_macs < alone.macs - alone.selection_macs


# -- the schedule and MACs against what the prefill runs ------------------------------------

#: (family, method, options): the LLM-stage methods on LLaVA-1.5, on the multi-crop LLaVA-NeXT
#: and LLaVA-OneVision (SparseVLM recycles per crop; at keep 3 some crops get no share of the
#: later stages) and on Gemma 3 (its SigLIP tower runs its pooling head); random there too.
EXACT_CASES = [
    *[
        pytest.param(family, method, VISUAL_OPTIONS[method], id=f"{family}-{method}")
        for family in ("llava", "llava_next", "gemma3")
        for method in ("fastv", "pyramiddrop", "dart", "sparsevlm")
    ],
    pytest.param("llava_onevision", "sparsevlm", {"keep": 0.5}, id="llava_onevision-sparsevlm"),
    pytest.param("llava_next", "sparsevlm", {"keep": 3}, id="llava_next-sparsevlm-3"),
    pytest.param("gemma3", "random", {"keep_ratio": 0.5}, id="gemma3-random"),
]


def _layer_tokens(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[int]:
    """Visual tokens each decoder layer runs on in the prefill of `batch` (its sequence length
    less the REFERENCE_PROMPT text tokens), read by hooks on the layers."""
    lengths = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        lengths.append(hidden.shape[1] - REFERENCE_PROMPT)

    hooks = [
        layer.register_forward_pre_hook(record, with_kwargs=True)
        for layer in family_for(model)(model).language_model.layers
    ]
    try:
        with torch.no_grad():
            model(**batch, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return lengths


@pytest.mark.parametrize(("family", "method", "options"), EXACT_CASES)
def test_schedule_and_macs_are_what_the_prefill_runs(family, method, options):
    """The schedule's visual tokens per decoder layer are those the layers run on, and the MACs
    (model and selection) are the counted ones within 0.1% (SparseVLM's per-crop recycling was
    4 tokens short per layer on the crops, -2.2%; Gemma 3's tower head was left out, -2.2%;
    PyramidDrop's scoring was priced at the tokens after its cut, -0.2 to -0.4%)."""
    model = tiny_vlm(family)
    batch = _prompt(model, family)
    config = tokcomp.config_of(tokcomp.apply(model, method, **options))
    depth = config.model["llm_depth"]
    assert config.schedule[-depth:] == _layer_tokens(model, batch)
    assert config.macs == pytest.approx(_prefill(model, batch), rel=1e-3)
