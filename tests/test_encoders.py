"""Every method on open_clip and Hugging Face vision encoders: exact at keep-everything,
`remove` restores, CLIP zero-shot, batch independence, protected tokens, size-aware pooling,
configs, MACs, and clear errors for what compression cannot honour."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from conftest import BATCH_POSITION_DEPENDENT, spread_weights, tiny_vit
from method_options import keep_all, middle
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tokcomp
from tokcomp.adapters import base, find_adapter
from tokcomp.errors import UsageError
from tokcomp.methods.diffrate_search import DiffRateRates, DiffRateSearch
from tokcomp.schedule import model_macs

METHODS = tokcomp.methods("vision")
#: Methods that only merge: every input patch stays in exactly one token.
MERGE_ONLY = {"tome", "pitome"}

_OPEN_CLIP = dict(
    image_size=32, patch_size=4, width=48, layers=3, heads=3, mlp_ratio=4.0, output_dim=16
)
_OPEN_CLIP_TEXT = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
_HF = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=3,
    image_size=32,
    patch_size=4,
)
_HF_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=8,
)


@dataclass(frozen=True)
class Case:
    """A tiny model of one supported kind and the image-level output to compare."""

    build: Callable[[], nn.Module]
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _open_clip_vit(**options) -> nn.Module:
    return VisionTransformer(**{**_OPEN_CLIP, **options})


def _open_clip_vision_cfg(**options) -> dict:
    vision = dict(_OPEN_CLIP, head_width=16, **options)
    for name in ("heads", "output_dim"):
        del vision[name]
    return vision


def _open_clip_clip() -> nn.Module:
    vision = _open_clip_vision_cfg()
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=_OPEN_CLIP_TEXT)


def _open_clip_coca() -> nn.Module:
    """CoCa: attention-pooled image tower (its tokens feed the text decoder)."""
    pool = dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2)
    vision = _open_clip_vision_cfg(**pool, output_tokens=True)
    text = dict(_OPEN_CLIP_TEXT, embed_cls=True, output_tokens=True)
    return open_clip.CoCa(
        embed_dim=32, multimodal_cfg=_OPEN_CLIP_TEXT, text_cfg=text, vision_cfg=vision
    )


def _hf_clip() -> nn.Module:
    config = hf.CLIPConfig(text_config=_HF_TEXT, vision_config=_HF, projection_dim=16)
    return hf.CLIPModel(config)


def _hf_siglip() -> nn.Module:
    return hf.SiglipModel(hf.SiglipConfig(text_config=_HF_TEXT, vision_config=_HF))


def _pooled(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images).pooler_output


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.get_image_features(pixel_values=images).pooler_output


CASES: dict[str, Case] = {
    "open_clip_clip": Case(_open_clip_clip, lambda m, x: m.encode_image(x)),
    "open_clip_avg_layerscale": Case(
        functools.partial(_open_clip_vit, pool_type="avg", ls_init_value=0.5), lambda m, x: m(x)
    ),
    "open_clip_coca": Case(_open_clip_coca, lambda m, x: m.encode_image(x)),
    "open_clip_parallel_pools": Case(
        functools.partial(
            _open_clip_vit,  # open_clip's ln_post here needs output_dim == width
            attentional_pool="parallel",
            attn_pooler_queries=4,
            attn_pooler_heads=2,
            output_dim=48,
        ),
        lambda m, x: m(x),
    ),
    "open_clip_ln_after_pool_tokens": Case(
        functools.partial(_open_clip_vit, final_ln_after_pool=True, output_tokens=True),
        lambda m, x: m(x)[0],
    ),
    "hf_clip": Case(_hf_clip, _image_features),
    "hf_siglip": Case(_hf_siglip, _image_features),
    "hf_vit": Case(lambda: hf.ViTModel(hf.ViTConfig(**_HF)), _pooled),
    "hf_dinov2_swiglu": Case(
        lambda: hf.Dinov2Model(hf.Dinov2Config(**_HF, layerscale_value=0.5, use_swiglu_ffn=True)),
        _pooled,
    ),
    "hf_dinov2_registers": Case(
        lambda: hf.Dinov2WithRegistersModel(
            hf.Dinov2WithRegistersConfig(**_HF, layerscale_value=0.5, num_register_tokens=2)
        ),
        _pooled,
    ),
}


@functools.cache
def _built(case: str) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[case].build().eval()
    spread_weights(model)
    return model


def tiny(case: str) -> nn.Module:
    """A fresh copy of the tiny randomly initialised model of `case`."""
    return copy.deepcopy(_built(case))


def _clip_tower() -> nn.Module:
    """A fresh tiny Hugging Face CLIPVisionModel."""
    return tiny("hf_clip").vision_model


def _geometry(model: nn.Module) -> tuple[int, int]:
    spec = find_adapter(model).spec()
    return spec.tokens, spec.depth


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread than on two busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(params=sorted(CASES))
def case(request) -> str:
    return request.param


# -- every method on every family ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_keep_everything_is_exact_and_remove_restores(method, case, images):
    model, output = tiny(case), CASES[case].output
    expected = output(model, images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokcomp.apply(model, method, **keep_all(method, *_geometry(model)))
    assert tokcomp.config_of(model).macs_ratio == 1.0
    torch.testing.assert_close(output(model, images), expected, atol=1e-5, rtol=0)
    tokcomp.remove(model)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(output(model, images), expected)


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_middle_budget_is_batch_independent_and_keeps_protected_tokens(method, case, images):
    model, output = tiny(case), CASES[case].output
    tokens, depth = _geometry(model)
    tokcomp.apply(model, method, trace_source=True, **middle(method, tokens, depth))
    assert tokcomp.config_of(model).macs_ratio < 1.0
    if method not in BATCH_POSITION_DEPENDENT:
        alone = torch.cat([output(model, images[i : i + 1]) for i in range(len(images))])
        torch.testing.assert_close(output(model, images), alone, atol=1e-5, rtol=1e-5)

    state = tokcomp.forward_tokens(model, images)
    assert state.tokens == tokcomp.config_of(model).schedule[-1] < tokens
    _assert_protected_kept_alone(state, find_adapter(model).spec().class_token)
    assert state.source.sum(dim=1).max() <= 1  # no patch in two tokens
    if method in MERGE_ONLY:
        assert torch.equal(state.source.sum(dim=1), torch.ones(len(images), tokens))
        torch.testing.assert_close(state.size.sum(dim=1), torch.full((len(images),), 1.0 * tokens))


def _self_attention_rows(monkeypatch) -> list[int]:
    """The rows of every fused self-attention call from now on (not the pools' queries)."""
    rows, fused = [], F.scaled_dot_product_attention

    def recording(q, k, *args, **kwargs):
        if q.shape[-2] == k.shape[-2]:
            rows.append(q.shape[-2])
        return fused(q, k, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return rows


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", [*sorted(CASES), "timm"])
@torch.no_grad()
def test_attention_rows_padded_for_the_bfloat16_cpu_kernel_change_nothing(
    method, case, images, monkeypatch
):
    """The rows a block pads for PyTorch's bfloat16 CPU attention (to a multiple of 16) are
    masked out and dropped: forced on in float32, where the comparison is exact to rounding,
    the output is the unpadded one, and every fused attention ran on padded rows."""
    model = tiny_vit() if case == "timm" else tiny(case)
    output = (lambda m, x: m(x)) if case == "timm" else CASES[case].output
    tokcomp.apply(model, method, **middle(method, *_geometry(model)))
    want = output(model, images)
    monkeypatch.setattr(base, "_bfloat16_on_cpu", lambda x: True)
    rows = _self_attention_rows(monkeypatch)
    got = output(model, images)
    assert all(count % base.BFLOAT16_ATTENTION_ROWS == 0 for count in rows)
    # Zero-TPrune, and EViT without a class token, may attend through the matrix everywhere
    assert rows or method in {"zero_tprune", "evit"}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "autocast", "padded"),
    [
        (torch.float32, torch.bfloat16, True),
        (torch.bfloat16, None, True),
        (torch.float32, None, False),
        (torch.float32, torch.float16, False),
    ],
)
@torch.no_grad()
def test_attention_rows_are_padded_where_the_cpu_attention_runs_in_bfloat16(
    dtype, autocast, padded, images, monkeypatch
):
    """Padding goes with bfloat16 CPU attention (a bfloat16 model, or CPU autocast to it)
    only; the blocks whose method needs the attention matrix keep their rows."""
    tokens = _geometry(tiny_vit())[0]
    model = tokcomp.apply(tiny_vit().to(dtype), "tome", r=3)
    rows = _self_attention_rows(monkeypatch)
    with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
        model(images.to(dtype))
    schedule = [tokens, *tokcomp.config_of(model).schedule[:-1]]
    padding = base.BFLOAT16_ATTENTION_ROWS if padded else 1
    assert rows == [-(-count // padding) * padding for count in schedule]
    assert (rows != schedule) == padded

    rows.clear()
    tokcomp.apply(model, "zero_tprune", keep_ratio=0.7, layers=[1, 2])
    with torch.autocast("cpu", torch.bfloat16):
        model(images.to(dtype))
    assert len(rows) == 2  # the two blocks that prune attend through the attention matrix


@pytest.mark.parametrize(
    ("case", "tower_of", "encode"),
    [
        ("hf_clip", lambda m: m.vision_model, lambda t, x: t(pixel_values=x).pooler_output),
        ("open_clip_clip", lambda m: m.visual, lambda t, x: t(x)),
    ],
)
@torch.no_grad()
def test_a_model_and_its_tower_are_not_patched_apart(case, tower_of, encode, images):
    """Two patches on one tower: the later one ran while config_of named the other."""
    model = tiny(case)
    tower = tower_of(model)
    tokcomp.apply(model, "tome", r=8)
    compressed = encode(tower, images)
    with pytest.raises(ValueError, match=f"is part of a {type(model).__name__} that tokcomp"):
        tokcomp.apply(tower, "tome", r=4)
    assert not tokcomp.is_patched(tower) and tokcomp.config_of(model).options["r"] == 8
    torch.testing.assert_close(encode(tower, images), compressed, atol=0, rtol=0)

    tokcomp.remove(model)
    tokcomp.apply(tower, "tome", r=4)
    with pytest.raises(ValueError, match=r"model\.\w+ \(\w+\) is patched on its own"):
        tokcomp.apply(model, "tome", r=8)
    assert not tokcomp.is_patched(model) and tokcomp.config_of(tower).options["r"] == 4


@torch.no_grad()
def test_an_empty_batch_gives_empty_outputs_of_the_right_shape(case, images):
    model, output = tiny(case), CASES[case].output
    tokcomp.apply(model, "tome", r=4)
    full, empty = output(model, images), output(model, images[:0])
    assert empty.shape == (0, *full.shape[1:]) and empty.dtype == full.dtype
    state = tokcomp.forward_tokens(model, images[:0])
    assert state.x.shape == (0, *tokcomp.forward_tokens(model, images).x.shape[1:])


def _first_block_and_attention(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The first block of a tiny model's vision transformer (any family; not of a CLIP's text
    tower), and its attention module."""
    blocks = [
        (name, module)
        for name, module in model.named_modules()
        if name.endswith(("blocks.0", "resblocks.0", "layers.0", "layer.0"))
    ]
    vision = [(n, m) for n, m in blocks if "vision" in n or "visual" in n]
    for _, module in vision or blocks:
        attention = next(m for n, m in module.named_children() if "attn" in n or "attention" in n)
        return module, attention
    raise AssertionError("no block found")


def _checkpoint_activations(model: nn.Module) -> None:
    """Turn gradient checkpointing on, each library its own way."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers
        model.activation_checkpointing_enable()
    else:
        model.set_grad_checkpointing(True)


@pytest.mark.parametrize("case", [*sorted(CASES), "timm"])
def test_what_the_compressed_blocks_would_leave_out_is_refused(case, images):
    """Hooks on a block or its attention would never fire, and gradient checkpointing would
    not checkpoint: both are refused, not dropped; hooks elsewhere and no-grad runs go on."""
    model = tiny_vit() if case == "timm" else tiny(case)
    output = (lambda m, x: m(x)) if case == "timm" else CASES[case].output
    tokcomp.apply(model, "tome", r=1)
    for module in _first_block_and_attention(model):
        handle = module.register_forward_hook(lambda *_: None)
        with pytest.raises(UsageError, match=r"forward hooks on \S+ would never run"):
            output(model, images)
        handle.remove()
    mlp_inputs = []
    block, _ = _first_block_and_attention(model)
    mlp = next(m for n, m in block.named_children() if "mlp" in n)
    handle = mlp.register_forward_pre_hook(lambda _, args: mlp_inputs.append(args[0].shape[1]))
    output(model, images)
    handle.remove()
    assert mlp_inputs and mlp_inputs[0] < _geometry(model)[0]  # ran, on the compressed tokens
    _checkpoint_activations(model)
    with pytest.raises(UsageError, match="gradient checkpointing is on"):
        output(model, images)
    with torch.no_grad():
        output(model, images)


def _assert_protected_kept_alone(state, class_token: bool) -> None:
    """Each protected row holds exactly one protected input token, all of them are there,
    and the class token stays first."""
    batch, protected = state.x.shape[0], state.protected
    rows = state.source[:, :protected]
    assert torch.equal(rows.sum(dim=2), torch.ones(batch, protected))
    held = rows.argmax(dim=2)
    assert torch.equal(held.sort(dim=1).values, torch.arange(protected).expand(batch, -1))
    if class_token:
        assert torch.equal(held[:, 0], torch.zeros(batch, dtype=torch.long))


def test_protected_tokens_per_family():
    protected = {case: find_adapter(tiny(case)).spec().protected for case in CASES}
    assert protected == {
        **{case: 1 for case in CASES},
        "hf_siglip": 0,
        "hf_dinov2_registers": 3,
    }


# -- CLIP zero-shot: image tower compressed, text tower untouched -------------------------


def _open_clip_zero_shot(model: nn.Module, images: torch.Tensor, text: torch.Tensor):
    image = model.encode_image(images, normalize=True)
    text_features = model.encode_text(text, normalize=True)
    return 100 * image @ text_features.T, text_features


def _hf_zero_shot(model: nn.Module, images: torch.Tensor, text: torch.Tensor):
    out = model(input_ids=text, pixel_values=images)
    return out.logits_per_image, out.text_embeds


@pytest.mark.parametrize(
    ("case", "zero_shot"),
    [("open_clip_clip", _open_clip_zero_shot), ("hf_clip", _hf_zero_shot)],
)
@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_clip_zero_shot(method, case, zero_shot, images):
    model = tiny(case)
    text = torch.randint(1, 64, (5, 8), generator=torch.Generator().manual_seed(2))
    logits, text_features = zero_shot(model, images, text)
    geometry = _geometry(model)
    tokcomp.apply(model, method, **keep_all(method, *geometry))
    kept, _ = zero_shot(model, images, text)
    assert torch.equal(kept.argmax(dim=1), logits.argmax(dim=1))
    tokcomp.apply(model, method, **middle(method, *geometry))
    compressed, compressed_text = zero_shot(model, images, text)
    assert compressed.shape == logits.shape and compressed.isfinite().all()
    assert torch.equal(compressed_text, text_features)


# -- pooling weighs each token by its size -------------------------------------------------


def _expanded(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Each token repeated as many times as the patches it holds (one sample)."""
    return x.repeat_interleave(size.round().long(), dim=0)[None]


@torch.no_grad()
def test_attention_pools_treat_a_merged_token_as_its_patches(images):
    siglip = tokcomp.apply(tiny("hf_siglip").vision_model, "tome", r=12)
    state = tokcomp.forward_tokens(siglip, images)
    for i, got in enumerate(siglip(pixel_values=images).pooler_output):
        expected = siglip.head(_expanded(state.x[i], state.size[i]))[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    coca = tokcomp.apply(tiny("open_clip_coca").visual, "tome", r=12)
    state = tokcomp.forward_tokens(coca, images)
    for i, got in enumerate(coca(images)[0]):
        queries = coca.ln_post(coca.attn_pool(_expanded(state.x[i], state.size[i])))
        torch.testing.assert_close(got, queries[0, 0] @ coca.proj, atol=1e-5, rtol=1e-5)

    parallel = tokcomp.apply(tiny("open_clip_parallel_pools"), "tome", r=12)
    state = tokcomp.forward_tokens(parallel, images)  # after ln_post: both pools read it
    for i, got in enumerate(parallel(images)):
        expected = parallel.attn_pool_contrastive(_expanded(state.x[i], state.size[i]))
        torch.testing.assert_close(got, expected[0] @ parallel.proj, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_average_pool_is_size_weighted(images):
    visual = tokcomp.apply(tiny("open_clip_avg_layerscale"), "tome", r=12)
    state = tokcomp.forward_tokens(visual, images)
    weights = state.size[:, 1:, None] / state.size[:, 1:].sum(dim=1)[:, None, None]
    expected = (state.x[:, 1:] * weights).sum(dim=1) @ visual.proj
    torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_average_pool_leaves_out_what_the_diffrate_search_masked(images):
    visual = tiny("open_clip_avg_layerscale")
    spec = find_adapter(visual).spec()
    search = DiffRateSearch(rates=DiffRateRates(spec), schedule=[spec.tokens] * spec.depth)
    tokcomp.apply(visual, search)
    state = tokcomp.forward_tokens(visual, images)
    assert (state.mask[:, 1:] == 0).any(dim=1).all()  # the search masked patches in every image
    weights = (state.size * state.mask)[:, 1:, None]
    expected = (state.x[:, 1:] * weights).sum(dim=1) / weights.sum(dim=1) @ visual.proj
    torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=1e-5)


def test_the_average_pools_mask_gradient_flows_through_its_sum_only():
    """As the released MAE search pools: (x * size * mask).sum() / num.detach()."""
    torch.manual_seed(0)
    x, size = torch.randn(2, 5, 3), torch.rand(2, 5) + 0.5
    mask = torch.rand(2, 5).requires_grad_()
    base.size_weighted_mean(x, size * mask).sum().backward()
    numerator_only = x.sum(dim=2) * size / (size * mask).sum(dim=1, keepdim=True).detach()
    torch.testing.assert_close(mask.grad, numerator_only)


@dataclass(frozen=True)
class AttentionPooled:
    """An attention-pooled tower: its pooled output for images, and the pooled output of one
    image's (1, n, C) tokens, as forward_tokens gives them, through the model's own pool."""

    build: Callable[[], nn.Module]
    pooled: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor]


ATTENTION_POOLED = {
    "hf_siglip": AttentionPooled(
        lambda: tiny("hf_siglip").vision_model,
        lambda m, x: m(pixel_values=x).pooler_output,
        lambda m, tokens: m.head(tokens)[0],
    ),
    "open_clip_coca": AttentionPooled(  # keys and values narrower than the queries (kdim)
        lambda: tiny("open_clip_coca").visual,
        lambda m, x: m(x)[0],
        lambda m, tokens: m.ln_post(m.attn_pool(tokens))[0, 0] @ m.proj,
    ),
    "open_clip_parallel_pools": AttentionPooled(
        lambda: tiny("open_clip_parallel_pools"),
        lambda m, x: m(x),
        lambda m, tokens: m.attn_pool_contrastive(tokens)[0] @ m.proj,
    ),
}


def _diffrate_search(model: nn.Module, rates: DiffRateRates) -> None:
    """Patch `model` with the DiffRate search learning `rates`."""
    spec = find_adapter(model).spec()
    tokcomp.apply(model, DiffRateSearch(rates=rates, schedule=[spec.tokens] * spec.depth))


def _pruning_rates(model: nn.Module, patches: int) -> DiffRateRates:
    """Search rates that keep `patches` patch tokens from block 1 on and merge none."""
    rates = DiffRateRates(find_adapter(model).spec())
    with torch.no_grad():
        for counter in rates.prune:
            counter.logits.copy_(torch.where(counter.candidates == patches, 30.0, -30.0))
        for counter in rates.merge:
            counter.logits.copy_(
                torch.where(counter.candidates == counter.candidates[0], 30.0, -30.0)
            )
    return rates


@pytest.mark.parametrize("pool", sorted(ATTENTION_POOLED))
@pytest.mark.parametrize("patches", [64, 24])
@torch.no_grad()
def test_attention_pools_leave_out_what_the_diffrate_search_masked(pool, patches, images):
    """The pooled output is that of the tokens the search kept, the masked ones removed
    (with every patch kept, the mask is all ones and the pool is the unmasked one)."""
    tower = ATTENTION_POOLED[pool]
    model = tower.build()
    _diffrate_search(model, _pruning_rates(model, patches))
    state = tokcomp.forward_tokens(model, images)
    kept = state.mask > 0.5
    assert (kept.sum(dim=1) == state.protected + patches).all()
    for i, got in enumerate(tower.pooled(model, images)):
        expected = tower.pool(model, state.x[i, kept[i]][None])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", sorted(ATTENTION_POOLED))
def test_the_diffrate_search_learns_the_last_rates_from_the_attention_pool(pool, images):
    """After the last block, only the pool reads the mask: its gradient reaches the rates."""
    tower = ATTENTION_POOLED[pool]
    model = tower.build()
    spec = find_adapter(model).spec()
    rates = DiffRateRates(spec)
    prune = [spec.tokens, *(spec.protected + patches for patches in (48, 24))]
    rates.start_at(prune, [spec.tokens] * spec.depth, spread=8.0)  # the last block prunes too
    _diffrate_search(model, rates)
    tower.pooled(model, images).square().sum().backward()
    grad = rates.prune[-1].logits.grad
    assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0


# -- Hugging Face call paths ---------------------------------------------------------------


@torch.no_grad()
def test_hf_outputs_tuples_and_hidden_states(images):
    model = tiny("hf_vit")
    unpatched = model(pixel_values=images, output_hidden_states=True).hidden_states
    kept = tokcomp.apply(model, "tome", r=0)(pixel_values=images, output_hidden_states=True)
    assert len(kept.hidden_states) == len(unpatched) == 4
    for got, want in zip(kept.hidden_states, unpatched, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    tokcomp.apply(model, "tome", r=10)
    out = model(pixel_values=images, output_hidden_states=True)
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts == [65, *tokcomp.config_of(model).schedule]
    last, pooled = model(images, return_dict=False)
    torch.testing.assert_close(last, out.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=0, rtol=0)
    selected = model(pixel_values=images, output_hidden_states=[0, -1]).hidden_states
    assert [h is None for h in selected] == [False, True, True, False]
    classifier = hf.ViTForImageClassification(hf.ViTConfig(**_HF, num_labels=5)).eval()
    tokcomp.apply(classifier, "tome", r=10)
    assert classifier(pixel_values=images, return_dict=False)[0].shape == (2, 5)


@torch.no_grad()
def test_intermediate_layer_entry_points_are_refused_and_restored_by_remove(images):
    """They would run the blocks uncompressed; remove gives them back."""
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=4)
    expected = tokcomp.remove(copy.deepcopy(model)).forward_intermediates(images)
    for call in (model.forward_intermediates, model.get_intermediate_layers):
        with pytest.raises(ValueError, match="does not compress forward_intermediates"):
            call(images)
    restored = tokcomp.remove(model).forward_intermediates(images)
    torch.testing.assert_close(restored, expected, atol=0, rtol=0)
    clip = tokcomp.apply(_open_clip_clip(), "tome", r=4)
    with pytest.raises(ValueError, match="does not compress forward_intermediates"):
        clip.forward_intermediates(image=images)


def test_hf_refuses_what_compression_cannot_honour(images):
    model = tokcomp.apply(_clip_tower(), "tome", r=4)
    with pytest.raises(ValueError, match="output_attentions=True is not available"):
        model(pixel_values=images, output_attentions=True)
    with pytest.raises(
        ValueError, match=r"48x48 input gives 145; set model\.config\.image_size = 48"
    ):
        model(pixel_values=torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True)
    vit = tokcomp.apply(tiny("hf_vit"), "tome", r=4)
    with pytest.raises(ValueError, match="attention_mask and is_causal are not supported"):
        vit(pixel_values=images, attention_mask=torch.ones(2, 65))
    with pytest.raises(ValueError, match="attention_mask and is_causal are not supported"):
        vit(pixel_values=images, is_causal=True)  # the unpatched model honours it under sdpa
    vit(pixel_values=images, is_causal=False)
    masked = torch.zeros(2, 64, dtype=torch.bool)  # ViTModel's second argument
    with pytest.raises(ValueError, match="takes only pixel_values by position; pass its other"):
        vit(images, masked)


HF_CASES = [case for case in sorted(CASES) if case.startswith("hf_")]


def _at_any_size(case: str, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CASES[case]'s output, position embeddings interpolated to the images' size."""
    options = {} if "dinov2" in case else {"interpolate_pos_encoding": True}  # DINOv2 always does
    forward = model.get_image_features if case in ("hf_clip", "hf_siglip") else model
    return forward(pixel_values=images, **options).pooler_output


@pytest.mark.parametrize("case", HF_CASES)
@torch.no_grad()
def test_hf_compresses_at_the_config_image_size_not_the_built_one(case, images, monkeypatch):
    native = find_adapter(tiny(case)).spec()  # built for the 32 px images
    monkeypatch.setitem(_HF, "image_size", 48)  # built like facebook/dinov2 (518) fed 224 px
    torch.manual_seed(0)
    model = CASES[case].build().eval()
    spread_weights(model)
    expected = _at_any_size(case, model, images)
    wrapped = case in ("hf_clip", "hf_siglip")
    (model.vision_model if wrapped else model).config.image_size = 32
    tokcomp.apply(model, "tome", **keep_all("tome", *_geometry(model)))
    assert find_adapter(model).spec() == native
    assert tokcomp.config_of(model).macs == model_macs(native)
    torch.testing.assert_close(_at_any_size(case, model, images), expected, atol=1e-5, rtol=0)
    config = r"model\.vision_model\.config" if wrapped else r"model\.config"
    with pytest.raises(ValueError, match=config + r"\.image_size = 48 and apply tokcomp again"):
        _at_any_size(case, model, torch.randn(1, 3, 48, 48))


def test_unsupported_variants_are_named():
    with pytest.raises(tokcomp.UnsupportedModelError, match="CustomResidualAttentionBlock"):
        tokcomp.apply(_open_clip_vit(qk_norm=True), "tome", r=1)
    dinov2_classifier = hf.Dinov2ForImageClassification(hf.Dinov2Config(**_HF))
    with pytest.raises(tokcomp.UnsupportedModelError, match=r"supported: .*Dinov2Model"):
        tokcomp.apply(dinov2_classifier, "tome", r=1)
    visual = tokcomp.apply(_open_clip_vit(patch_dropout=0.5).train(), "tome", r=1)
    with pytest.raises(ValueError, match="patch dropout is active"):
        visual(torch.randn(1, 3, 32, 32))


def test_open_clip_towers_without_embeds_are_compressed_exactly(images, monkeypatch):
    """open_clip before 2.32 has no VisionTransformer._embeds: tokcomp embeds the patches."""
    visual = _open_clip_vit(pool_type="avg")
    expected = visual(images)
    monkeypatch.delattr(VisionTransformer, "_embeds", raising=False)
    tokcomp.apply(visual, "tome", **keep_all("tome", *_geometry(visual)))
    torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=0)


def test_image_towers_are_recognised_on_their_own():
    assert find_adapter(tiny("open_clip_clip").visual).name == "open_clip"
    assert find_adapter(tiny("hf_clip").vision_model).name == "hf_vision"
    assert find_adapter(tiny("hf_siglip").vision_model).spec().class_token is False


# -- configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@torch.no_grad()
def test_hf_config_reloads_on_the_same_architecture(method, tmp_path, images):
    model = _clip_tower()
    tokcomp.apply(model, method, **middle(method, *_geometry(model)))
    path = tokcomp.config_of(model).save(tmp_path / "clip.json")
    other = tokcomp.apply(_clip_tower(), path)
    assert tokcomp.config_of(other) == tokcomp.config_of(model)
    torch.testing.assert_close(_pooled(other, images), _pooled(model, images), atol=0, rtol=0)


def test_hf_config_is_refused_on_another_architecture(tmp_path):
    model = tokcomp.apply(_clip_tower(), "tome", r=4)
    path = tokcomp.config_of(model).save(tmp_path / "clip.json")
    deeper = hf.CLIPVisionModel(hf.CLIPVisionConfig(**{**_HF, "num_hidden_layers": 4}))
    with pytest.raises(tokcomp.ConfigError, match=r"model\.depth=3, but the model has depth=4"):
        tokcomp.apply(deeper, path)
    with pytest.raises(tokcomp.ConfigError, match=r"model\.tokens=65, but the model has tokens=64"):
        tokcomp.apply(tiny("hf_siglip").vision_model, path)
    with pytest.raises(tokcomp.ConfigError, match=r"model\.family='hf_vision'.*family='open_clip'"):
        tokcomp.apply(tiny("open_clip_clip"), path)


# -- analytic MACs against torch's FLOP counter --------------------------------------------


def _counted_macs(forward: Callable[[], object], batch: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        forward()
    return counter.get_total_flops() / 2 / batch


@pytest.mark.parametrize("options", [None, {"r": 8}])
def test_an_unpooled_open_clip_tower_projects_every_token_it_keeps(options):
    """pool_type='none': the projection runs on each token reaching the head, which the MACs
    count (they counted it once: 0.6% low here). Unpruned exactly; merged, the matching's own
    MACs (a compiled op the counter cannot see) left out, within 0.1% (the counter finds
    0.08% more batched products)."""
    torch.manual_seed(0)
    model = _open_clip_vit(image_size=64, patch_size=8, pool_type="none", output_dim=32).train()
    images = torch.randn(1, 3, 64, 64)
    if options is None:
        analytic = model_macs(find_adapter(model).spec())
    else:
        config = tokcomp.config_of(tokcomp.apply(model, "tome", **options))
        analytic = config.macs - config.selection_macs
    assert analytic == pytest.approx(
        _counted_macs(lambda: model(images), 1), rel=1e-3 * bool(options)
    )


@pytest.mark.parametrize("family", ["open_clip", "hf_vision"])
@pytest.mark.parametrize("options", [None, {"r": 8}])
def test_analytic_macs_within_2_percent_of_flop_counter(family, options):
    torch.manual_seed(0)
    size = dict(image_size=64, patch_size=8)
    if family == "open_clip":
        # train mode (no dropout here) keeps nn.MultiheadAttention off its fused path, which
        # the FLOP counter cannot see into
        model = _open_clip_vit(**size, width=96, heads=3, output_dim=32).train()
    else:
        config = hf.CLIPVisionConfig(**{**_HF, **size, "hidden_size": 96, "intermediate_size": 384})
        model = hf.CLIPVisionModel._from_config(config, attn_implementation="eager").eval()
    images = torch.randn(1, 3, 64, 64)
    if options is None:
        analytic = model_macs(find_adapter(model).spec())
    else:
        analytic = tokcomp.config_of(tokcomp.apply(model, "tome", **options)).macs
    assert analytic == pytest.approx(_counted_macs(lambda: model(images), 1), rel=0.02)
