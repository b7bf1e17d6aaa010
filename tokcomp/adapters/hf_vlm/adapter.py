"""The hf_vlm adapter: patches a VLM's inner model so a forward runs the pipeline in order:
the family's images to visual tokens (families/), the method's choice (selection), the pruned
prompt (sequence, generation), the language model (directly, or span by span for LLM-stage
methods: decoder), and later calls of a generation translated to the pruned cache."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tokcomp.adapters.base import Adapter, Compression, Patch, patched_on_its_own
from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.adapters.hf_vlm.decoder import decode_pruned, llm_stage_decode, llm_stage_prefill
from tokcomp.adapters.hf_vlm.families import (
    ADAPTER_NAME,
    Images,
    VLMFamily,
    family_for,
    handled_classes,
    in_prompt_order,
    video_classes,
)
from tokcomp.adapters.hf_vlm.generation import (
    COPIES,
    Call,
    Cut,
    Decoding,
    Pruned,
    Span,
    copied_rows,
    cut_prompt,
    decode_positions,
    first_copies,
    inner_output,
    pruned_of,
    pruned_record,
)
from tokcomp.adapters.hf_vlm.selection import (
    Choice,
    choose,
    keep_all,
    place,
    with_prompt,
    with_text,
)
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.errors import UsageError
from tokcomp.libraries import HF_VLM
from tokcomp.methods import AttentionStyle, Method, Stage, TokenState, VisualMethod
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule import VLMSpec


class HFVLMAdapter(Adapter):
    """Patches the VLM's inner model: its forward (visual-token selection, sequence surgery,
    cache translation) and get_image_features (the vision hidden states a method needs)."""

    name = ADAPTER_NAME
    attention = AttentionStyle.SEPARATE_QKV
    library = HF_VLM
    supported = "Hugging Face VLMs " + ", ".join(handled_classes())

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vlm: VLMFamily = family_for(model)(model)
        self.tower_patch: Patch | None = None

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return family_for(model) is not None

    def spec(self) -> VLMSpec:
        return self.vlm.spec()

    def video_spec(self, frames: int) -> VLMSpec:
        """The geometry of a reference video of `frames` frames, in place of the reference image."""
        return replace(self.vlm.video_spec(frames), video=True)

    #: generate checks its keywords against the VLM's forward (and pre-encodes the images when
    #: the forward takes mm_encoder_outputs and get_image_features names its inputs: the
    #: patched get_image_features keeps (*args, **kwargs), so the prefill encodes them itself).
    signed = frozenset({"outer_forward"})

    def overrides(self) -> list[tuple[nn.Module, str, str]]:
        inner = self.vlm.inner
        methods = ["forward", "get_image_features"]
        if self.vlm.video_encoder_inputs:
            methods.append("get_video_features")
        expand = (self.model, "_expand_inputs_for_generation", "expand_inputs_for_generation")
        reorder = (self.model, "_reorder_cache", "reorder_cache")
        outer = [(self.model, "forward", "outer_forward"), (self.model, "generate", "generate")]
        return [*((inner, name, name) for name in methods), expand, reorder, *outer]

    def outer_forward(self, compression: Compression, *args: Any, **kwargs: Any) -> Any:
        """The VLM's forward, refusing what indexes the unpruned sequence its logits no longer
        follow: labels (the loss would score other tokens) and a tensor logits_to_keep."""
        if kwargs.get("labels") is not None:
            raise UsageError(
                "labels index the unpruned prompt, whose visual tokens tokcomp drops, so the loss "
                "would score other tokens: compute it from the logits of the kept sequence, or "
                "call tokcomp.remove(model) to train"
            )
        if isinstance(kwargs.get("logits_to_keep"), torch.Tensor):
            raise UsageError(
                "a tensor logits_to_keep indexes the unpruned sequence, whose visual tokens "
                "tokcomp drops: pass an int (the last n positions) or call tokcomp.remove(model)"
            )
        return type(self.model).forward(self.model, *args, **kwargs)

    def generate(self, compression: Compression, *args: Any, **kwargs: Any) -> Any:
        """generate, refusing the decoding modes a pruned cache cannot follow
        (`_refuse_decoding_modes`)."""
        config = kwargs.get("generation_config") or self.model.generation_config
        _refuse_decoding_modes(kwargs, config)
        return type(self.model).generate(self.model, *args, **kwargs)

    def expand_inputs_for_generation(
        self, compression: Compression, expand_size: int = 1, **kwargs: Any
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """generate's copies of each prompt for beams or several sequences. With images or
        videos, only the inputs aligned with the tokens are copied (generate would copy the
        visual ones row by row: patches, crops, a sample's images); the prefill, told the
        number of copies, runs once per prompt and copies its cache."""
        input_ids = kwargs.get("input_ids")
        visual = any(_is_pixels(name, value) for name, value in kwargs.items())
        if expand_size == 1 or not visual or input_ids is None:
            return type(self.model)._expand_inputs_for_generation(
                self.model, expand_size=expand_size, **kwargs
            )
        rows = input_ids.shape
        copied = {name: copied_rows(v, rows, expand_size, name) for name, v in kwargs.items()}
        return copied.pop("input_ids"), {**copied, COPIES: expand_size}

    def reorder_cache(self, compression: Compression, cache: Any, beam_idx: torch.Tensor) -> Any:
        """generate's beam search after each step: the cache's rows reordered by `beam_idx`,
        and with them the state of decode-time pruning a pruned prefill left on it."""
        cache.reorder_cache(beam_idx)
        pruned = pruned_of(cache)
        if pruned is not None:
            pruned.reordered(beam_idx).attach(cache)
        return cache

    def check(self, compression: Compression) -> None:
        """A visual-token method's options checked against the vision tower."""
        if isinstance(compression.method, VisualMethod):
            compression.method.check_tower(getattr(self.vlm, "tower", None))

    def install(self, patch: Patch) -> None:
        """Patch the inner model; a block method, or a visual-token method's tower merging, also
        patches the vision tower."""
        compression = patch.compression
        super().install(patch)
        tower = compression.tower
        if not isinstance(compression.method, VisualMethod):
            spec = compression.spec.tower()
            tower = Compression(compression.method, compression.schedule, spec)
        if tower is not None:
            self.tower_patch = Patch(HFVisionAdapter(self.vlm.tower), tower, self.model)
            self.tower_patch.adapter.install(self.tower_patch)

    def uninstall(self) -> None:
        super().uninstall()
        if self.tower_patch is not None:
            self.tower_patch.adapter.uninstall()
            self.tower_patch = None

    def forward_tokens(self, compression: Compression, *args: Any, **kwargs: Any) -> TokenState:
        raise ValueError(
            "forward_tokens runs a vision encoder's trunk; a VLM returns its language model's "
            "outputs: call the model (or generate) instead"
        )

    # -- the patched methods -------------------------------------------------------------------
    def get_image_features(self, compression: Compression, *args: Any, **kwargs: Any) -> Any:
        """The model's own get_image_features, with the vision hidden states the method needs."""
        self._refuse_tower_patched_apart()
        return self.vlm.encode(args, kwargs, _visual_needs(compression.method))

    def get_video_features(self, compression: Compression, *args: Any, **kwargs: Any) -> Any:
        """The model's own get_video_features, with the vision hidden states the method needs
        (patched, as get_image_features, so that generate leaves the videos to the forward)."""
        self._refuse_tower_patched_apart()
        return self.vlm.encode_videos(args, kwargs, _visual_needs(compression.method))

    def _refuse_tower_patched_apart(self) -> None:
        """Refuse a vision tower tokcomp.apply patched on its own after this VLM (apply refuses
        the other order): its tokens would reach the language model unseen by this patch's
        schedule, MACs and budgets."""
        tower = getattr(self.vlm, "tower", None)
        if tower is not None and patched_on_its_own(tower):
            raise UsageError(
                "this VLM's vision tower is patched on its own: call tokcomp.remove on the "
                "tower (a LLaVA-family VLM merges inside its vision tower through "
                "tokcomp.apply's tower= option)"
            )

    def forward(
        self,
        compression: Compression,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The inner model's forward on the pruned sequence: a prefill with images or videos
        chooses and packs; a later call on a cache it filled is translated to the pruned cache."""
        copies = kwargs.pop(COPIES, 1)
        images = {name: kwargs.pop(name) for name in self.vlm.image_inputs if name in kwargs}
        encoded = {kind: (mm_encoder_outputs or {}).get(kind) for kind in ("image", "video")}
        with_images = images.get("pixel_values") is not None or encoded["image"] is not None
        videos = images.get("pixel_values_videos", kwargs.get("pixel_values_videos"))
        with_videos = videos is not None or encoded["video"] is not None
        if with_videos and not self.vlm.video_encoder_inputs:
            raise ValueError(
                f"tokcomp prunes the image tokens of {type(self.vlm.model).__name__}; its video "
                f"inputs are not supported ({', '.join(video_classes())} take videos)"
            )
        call = Call(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs
        )
        pruned = pruned_of(cache)
        if pruned is not None and not (with_images or with_videos):
            return self._decode(compression.method, pruned, call)
        if not (with_images or with_videos):
            return type(self.vlm.inner).forward(self.vlm.inner, **call.as_kwargs(), **images)
        if copies > 1:  # generate's copies of each prompt: the prefill runs once per prompt
            call, images = self._once_per_prompt(call, images, copies)
        if with_images and encoded["image"] is None:
            inputs = _present(images, self.vlm.encoder_inputs)
            encoded["image"] = self.get_image_features(compression, **inputs)
        if with_videos and encoded["video"] is None:
            inputs = _present(images, self.vlm.video_encoder_inputs)
            encoded["video"] = self.get_video_features(compression, **inputs)
        output = self._prefill(compression, call, images, encoded)
        return output if copies == 1 else _copied(output, copies)

    # -- prefill and decoding ------------------------------------------------------------------
    def _once_per_prompt(
        self, call: Call, images: dict[str, Any], copies: int
    ) -> tuple[Call, dict[str, Any]]:
        """The prefill call and images of a batch holding each prompt `copies` times in a row,
        on one copy of each (its cache and outputs are copied after: `_copied`)."""
        if not call.uses_cache(self.vlm.language_model.config):
            raise ValueError(
                "beams or several sequences per prompt on a pruned VLM copy the prompt's "
                "cache: generate with use_cache=True (the default)"
            )
        rows = call.input_ids.shape
        once = {name: first_copies(value, rows, copies, name) for name, value in images.items()}
        return call.once_per(copies), once

    def _prefill(
        self,
        compression: Compression,
        call: Call,
        images: dict[str, Any],
        encoded: dict[str, Any],
    ) -> Any:
        vlm, method = self.vlm, compression.method
        _check_prefill_call(call)
        call = call.with_cache(vlm.language_model.config)
        prompt = self._prompt(call, images)
        found = self._found(prompt, call.input_ids, images, encoded, compression)
        if isinstance(method, VisualMethod) and method.stage is Stage.LLM:
            hidden, pruned = llm_stage_prefill(vlm, method, call, prompt, found)
            pruned.attach(call.cache)
            return _decoder_output(hidden, call)
        choices, positions = _choices(method, found, prompt, call.input_ids)
        kept, tokens = place(prompt.placeholder, found.counts(), choices)
        cut = cut_prompt(vlm, prompt.filled(tokens, found.injected_rows()), kept, positions)
        output = vlm.language_model(
            inputs_embeds=cut.prompt.embeds,
            attention_mask=vlm.language_mask(cut.prompt, call.cache),
            position_ids=vlm.llm_positions(cut.prompt.positions),
            cache=call.cache,
            use_cache=call.use_cache,
            **vlm.injection_inputs(cut.prompt),
            **call.kwargs,
        )
        spans = [Span(0, cut.prompt.valid.long(), cut.shift)]
        record = pruned_record(vlm, prompt, spans, cut.dropped)
        if isinstance(method, VisualMethod) and method.decode_boundary() is not None:
            record = replace(record, decoding=self._decoding(prompt, call, found, cut))
        record.attach(call.cache)
        return inner_output(output)

    def _decoding(self, prompt: Prompt, call: Call, found: Images, cut: Cut) -> Decoding | None:
        """The state of decode-time pruning of the pruned prompt's videos (None without any)."""
        video = cut.carried(_video_tokens(prompt, call.input_ids, found, self.vlm.video_token_id))
        return Decoding(video) if bool(video.any()) else None

    def _found(
        self,
        prompt: Prompt,
        input_ids: torch.Tensor,
        images: dict[str, Any],
        encoded: dict[str, Any],
        compression: Compression,
    ) -> Images:
        """The visual tokens of the prompt's images and videos, in placeholder order."""
        vlm, needs = self.vlm, _visual_needs(compression.method)
        found = None
        if encoded["image"] is not None:
            found = vlm.images(encoded["image"], images, needs, compression.spec.visual_tokens)
        if encoded["video"] is None:
            return found
        videos = vlm.videos(encoded["video"], images, needs)
        is_video = input_ids[prompt.placeholder] == vlm.video_token_id
        return in_prompt_order(found, videos, is_video)

    def _prompt(self, call: Call, images: dict[str, Any]) -> Prompt:
        """The prompt of a prefill call, placeholders still holding the image token's embedding."""
        vlm, input_ids, mask = self.vlm, call.input_ids, call.attention_mask
        placeholder = vlm.placeholders(input_ids)
        valid = torch.ones_like(placeholder) if mask is None else mask.bool()
        positions = vlm.positions(input_ids, mask, call.position_ids, {**images, **call.kwargs})
        embeds = vlm.language_model.get_input_embeddings()(input_ids)
        bidirectional = vlm.bidirectional_images({**images, **call.kwargs})
        return Prompt(embeds, placeholder, valid, positions, mask, bidirectional)

    def _decode(self, method: Method, pruned: Pruned, call: Call) -> Any:
        """New tokens on a cache a pruned prefill filled: mask and positions (and an LLM-stage
        method's two spans of layers) translated from the original numbering; a decoding step
        of one token with decode-time pruning (DyCoke) skips the video tokens it drops."""
        vlm, language = self.vlm, self.vlm.language_model
        call = call.with_cache(language.config)
        embeds = call.inputs_embeds
        if embeds is None:
            embeds = language.get_input_embeddings()(call.input_ids)
        new = pruned.new_tokens(call.cache)
        if len(pruned.spans) > 1:
            return _decoder_output(llm_stage_decode(vlm, pruned, call, embeds, new), call)
        if pruned.decoding is not None:
            if embeds.shape[1] != 1:
                raise UsageError(
                    f"{method.name} prunes the video tokens each decoding step attends to, one "
                    f"token at a time; this call brings {embeds.shape[1]} (a continuation or "
                    "a verification of several tokens): decode one token per call, or apply it "
                    "with decode_p=0"
                )
            hidden = decode_pruned(vlm, method, pruned, call, embeds, new)
            return _decoder_output(hidden, call)
        (span,) = pruned.spans
        original = decode_positions(vlm, pruned, call, embeds.shape[1], new)
        output = language(
            inputs_embeds=embeds,
            attention_mask=span.mask_for(call.attention_mask, pruned.length, new + embeds.shape[1]),
            position_ids=vlm.llm_positions(original - span.shift[:, None]),
            cache=call.cache,
            use_cache=call.use_cache,
            **call.kwargs,
        )
        return inner_output(output)


def _refuse_decoding_modes(options: dict[str, Any], config: Any) -> None:
    """Refuse generate `options` (over generation `config`) a pruned cache cannot follow:
    assisted and prompt-lookup decoding (they crop the cache the prefill pruned) and caches
    other than a DynamicCache (static, sliding-window: their masks are not 2-D)."""
    from transformers.cache_utils import DynamicCache

    lookup = options.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens)
    if options.get("assistant_model") is not None or lookup:
        raise UsageError(
            "assisted and prompt-lookup decoding are not supported on a pruned VLM (they crop "
            "the cache the pruned prefill filled): generate without assistant_model and "
            "prompt_lookup_num_tokens, or call tokcomp.remove(model)"
        )
    implementation = options.get("cache_implementation", config.cache_implementation)
    given = options.get("past_key_values", options.get("cache"))
    other_cache = given is not None and not isinstance(given, DynamicCache)
    if implementation not in (None, "dynamic") or other_cache:
        raise UsageError(
            "a pruned VLM generation needs a DynamicCache (the default): static and other "
            "compiled caches are not supported; drop cache_implementation and past_key_values"
        )


def _present(inputs: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Those of `names` given in `inputs` (not None)."""
    return {name: inputs[name] for name in names if inputs.get(name) is not None}


def _visual_needs(method: Method) -> frozenset:
    """The visual signals `method` declared (none for block methods)."""
    return method.visual_needs if isinstance(method, VisualMethod) else frozenset()


def _video_tokens(
    prompt: Prompt, input_ids: torch.Tensor, images: Images, video_token_id: int
) -> torch.Tensor:
    """(B, L) the prompt's video tokens a method chooses from: placeholders of the video token
    in a segment (not LLaVA-OneVision's newline after a video's frames)."""
    starts = [0, *itertools.accumulate(images.counts())]
    in_segment = torch.zeros(starts[-1], dtype=torch.bool, device=input_ids.device)
    for segment in images.segments:
        in_segment[starts[segment.image] + segment.slots.to(in_segment.device)] = True
    video = torch.zeros_like(prompt.placeholder)
    video[prompt.placeholder] = in_segment & (input_ids[prompt.placeholder] == video_token_id)
    return video


def _check_prefill_call(call: Call) -> None:
    """Refuse a call with images that tokcomp cannot prune: no input_ids, or a filled cache."""
    if call.input_ids is None:
        raise ValueError(
            "tokcomp finds the image placeholders by their token id: pass input_ids, not "
            "inputs_embeds, with the images"
        )
    if call.cache is not None and call.cache.get_seq_length() > 0:
        raise ValueError("images can be given only with an empty cache (in the prefill)")


def _choices(
    method: Method, found: Images, prompt: Prompt, input_ids: torch.Tensor
) -> tuple[list[Choice], str]:
    """The visual tokens each image keeps before the language model, and how the kept ones
    are positioned: a visual method's choice (given the text or prompt it reads), or every
    token a block method left inside the tower, in the first places."""
    if not isinstance(method, VisualMethod) or found.placeholders is not None:
        return keep_all(found), "renumber"
    if VisualSignal.TEXT in _visual_needs(method):
        found = with_text(found, prompt)
    if VisualSignal.PROMPT in _visual_needs(method):
        found = with_prompt(found, prompt, input_ids)
    return choose(method, found), method.positions


def _decoder_output(hidden: torch.Tensor, call: Call) -> Any:
    """Hidden states of a span-by-span decoder run, as the inner model returns its output."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    cache = call.cache if call.use_cache else None
    return inner_output(BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache))


def _copied(output: Any, copies: int) -> Any:
    """A prefill's output, cache and Pruned record for a batch holding each of its prompts
    `copies` times in a row (generate's beams or sequences)."""
    cache = output.cache
    if cache is not None:
        cache.batch_repeat_interleave(copies)
        pruned_of(cache).copied(copies).attach(cache)
    for name, value in output.items():
        if isinstance(value, torch.Tensor):
            output[name] = value.repeat_interleave(copies, dim=0)
        elif isinstance(value, tuple):
            output[name] = tuple(v.repeat_interleave(copies, dim=0) for v in value)
    return output


def _is_pixels(name: str, value: Any) -> bool:
    """Whether generate's keyword `name` holds images or videos (pixel_values...)."""
    return name.startswith("pixel_values") and value is not None
