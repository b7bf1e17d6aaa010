"""Budget resolution for every method on every model: a method's options (native knobs,
`target_macs` or an explicit `schedule`) become its settled options and its schedule (tokens
left after each block; on a VLM, then the visual tokens each decoder layer processes)."""

from __future__ import annotations

from collections.abc import Iterable

from tokcomp.methods import BlockMethod, Method, VisualMethod, method_class, method_names
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule.macs import model_macs, total_macs
from tokcomp.schedule.spec import ModelSpec, VLMSpec

#: Signals only towers whose attention tokcomp recomputes can give.
_TOWER_SIGNALS = frozenset({VisualSignal.ATTENTION, VisualSignal.KEYS})
#: How close to the reachable range a `target_macs` may be (rounding of the MACs ratio).
_TARGET_SLACK = 0.005


def resolve(method: Method, spec: ModelSpec) -> tuple[Method, list[int]]:
    """The method with its knobs settled, and its schedule on `spec`.

    An explicit `schedule` is taken as is (a VLM's follows from the budget and must agree);
    a `target_macs` picks the method's candidate whose MACs are nearest (the error names the
    reachable range); otherwise the native knobs decide.
    """
    if isinstance(spec, VLMSpec):
        return _resolve_on_vlm(method, spec)
    if not isinstance(method, BlockMethod):
        raise ValueError(
            f"{method.name} prunes the visual tokens of a Hugging Face vision-language model; "
            f"this is a vision encoder ({spec.family}): use {_encoder_methods()}"
        )
    return _resolve_on_encoder(method, spec)


def resolve_with_tower(
    method: Method, tower: Method | None, spec: ModelSpec
) -> tuple[Method, BlockMethod | None, list[int]]:
    """`resolve`, with the block method `tower` (None: none) merging inside the VLM's vision
    tower and unmerging at its end beside the visual-token method `method` (docs/methods.md
    section 10.1): both settled, and the schedule: the tower's blocks at the merged counts,
    then the visual tokens each decoder layer processes."""
    if tower is None:
        method, schedule = resolve(method, spec)
        return method, None, schedule
    _check_tower_pair(method, tower, spec)
    tower, tower_schedule = _resolve_on_encoder(tower, spec.tower())
    method, schedule = _resolve_on_vlm(method, spec, tower_schedule)
    return method, tower, schedule


def _check_tower_pair(method: Method, tower: Method, spec: ModelSpec) -> None:
    """Refuse a tower method that cannot unmerge, a model whose tower tokcomp cannot merge
    in, and a method beside it that is no visual-token method."""
    check_tower_method(tower)
    if not isinstance(spec, VLMSpec) or not spec.tower_unmerge:
        raise ValueError(
            "tower= merges inside the vision tower of LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video "
            f"and LLaVA-OneVision only, not of {spec.label}: apply the method without tower="
        )
    if not isinstance(method, VisualMethod):
        raise ValueError(
            f"tower= runs beside a visual-token method; {method.name} is none: apply "
            f"{method.name} alone, or a visual-token method ({_runnable_on(spec)}) with tower="
        )
    if method.target_macs is not None:
        raise ValueError(
            f"{method.name}: target_macs cannot be given with tower=; give its budget "
            f"({method.budget}=...) and the tower method's"
        )
    if tower.target_macs is not None:
        raise ValueError(
            f"{tower.name}: target_macs cannot be given in tower_options; give its budget "
            f"({tower.budget}=...) there"
        )


def check_tower_method(tower: Method) -> None:
    """Refuse a method that cannot run inside a VLM's vision tower (tower=): one that does
    not only merge, whose tokens unmerge could not restore to the tower's grid."""
    if not _only_merges(type(tower)):
        mergers = [name for name in method_names() if _only_merges(method_class(name))]
        raise ValueError(
            f"tower={tower.name!r}: the tower method must be a block method that only merges "
            f"({' or '.join(mergers)}), so that unmerge restores the tower's grid"
        )


def _only_merges(method: type[Method]) -> bool:
    """Whether `method` is a block method (and no visual-token method) that only merges."""
    return (
        issubclass(method, BlockMethod)
        and not issubclass(method, VisualMethod)
        and method.only_merges
    )


def _resolve_on_encoder(
    method: BlockMethod, spec: ModelSpec, priced: ModelSpec | None = None
) -> tuple[Method, list[int]]:
    """`resolve` of a block method on the encoder `spec`; a `target_macs` is a fraction of the
    MACs of `priced` (default: `spec`; a VLM around the tower `spec`)."""
    method = method.settle(spec)
    if method.schedule is not None:
        schedule = list(method.schedule)
    elif method.target_macs is not None:
        candidates = method.candidates(spec)
        method, schedule = _nearest_to_target(method, priced or spec, candidates)
        method = method.settle(spec)  # the candidate as config_of reports it (ToMe's r)
    else:
        schedule = method.knob_schedule(spec)
    check_schedule(spec, schedule)
    method.check_schedule(spec, schedule)
    return method, schedule


def _resolve_on_vlm(
    method: Method, spec: VLMSpec, tower: list[int] | None = None
) -> tuple[Method, list[int]]:
    if not isinstance(method, VisualMethod):
        if not spec.tower_methods:
            raise ValueError(
                f"{method.name} acts inside a vision transformer; tokcomp can apply it to the "
                f"vision tower of LLaVA-1.5 only, not of {spec.architecture}. For this model "
                f"use {_runnable_on(spec)}"
            )
        return _resolve_on_encoder(method, spec.tower(), priced=spec)
    _check_visual_method(method, spec)
    method = method.settle(spec)
    if method.target_macs is not None:
        return _nearest_to_target(method, spec, method.budget_candidates(spec.selectable))
    schedule = visual_schedule(method, spec, tower)
    if method.schedule is not None and list(method.schedule) != schedule:
        raise ValueError(
            f"{method.name}: its options give the schedule {schedule} on {spec.architecture}, "
            f"but its schedule is {list(method.schedule)}: correct one of them (the schedule "
            f"follows from {method.budget_choices()}; a saved config: re-export it for this model)"
        )
    return method, schedule


def _check_visual_method(method: VisualMethod, spec: VLMSpec) -> None:
    """Refuse options and signals this VLM cannot give a visual-token method."""
    method.check_visual_options()
    if not _frames_given(type(method), spec):
        raise ValueError(
            f"{method.name} prunes videos (it needs their frames); tokcomp gives "
            f"{spec.architecture} no videos: use {_runnable_on(spec)} on it"
        )
    if not _signals_given(type(method), spec):
        raise ValueError(
            f"{method.name} needs the vision tower's attention at its feature layer, which "
            "tokcomp computes for the LLaVA families (CLIP/SigLIP towers), Gemma 3, Mistral 3 "
            "and Qwen3-VL, not for "
            f"{spec.architecture}; use {_runnable_on(spec)} on it"
        )


def _signals_given(method: type[VisualMethod], spec: VLMSpec) -> bool:
    """Whether `spec`'s adapter computes the tower signals `method` declares."""
    return spec.tower_attention or not method.visual_needs & _TOWER_SIGNALS


def _frames_given(method: type[VisualMethod], spec: VLMSpec) -> bool:
    """Whether `spec`'s adapter takes videos, where `method` needs their frames."""
    return spec.takes_videos or VisualSignal.FRAMES not in method.visual_needs


def _runnable_on(spec: VLMSpec) -> str:
    """The visual-token methods that run on `spec`, for error messages."""
    names = [
        name
        for name in method_names()
        if issubclass(method_class(name), VisualMethod)
        and _signals_given(method_class(name), spec)
        and _frames_given(method_class(name), spec)
    ]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _encoder_methods() -> str:
    """The methods that run on a vision encoder, for error messages."""
    names = [name for name in method_names() if issubclass(method_class(name), BlockMethod)]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def visual_schedule(
    method: VisualMethod, spec: VLMSpec, tower: list[int] | None = None
) -> list[int]:
    """A visual-token method's schedule on a VLM: the vision tower's blocks (keeping every
    token, or the `tower` schedule of a method merging there), then, per language-model layer,
    the visual tokens of the reference image it processes."""
    tower = tower or [spec.tokens] * spec.depth
    return tower + method.llm_schedule(
        spec.llm_depth, spec.selectable, spec.fixed_visual, spec.frames, spec.segments
    )


def _nearest_to_target(
    method: Method, spec: ModelSpec, candidates: Iterable[Method]
) -> tuple[Method, list[int]]:
    """The candidate whose MACs ratio (model and selection) is nearest `method.target_macs`."""
    options = [(c, _native_schedule(c, spec)) for c in candidates]
    base = model_macs(spec)
    ratios = [total_macs(spec, c, schedule) / base for c, schedule in options]
    target, lowest, highest = method.target_macs, min(ratios), max(ratios)
    if not lowest - _TARGET_SLACK <= target <= highest + _TARGET_SLACK:
        raise ValueError(
            f"{method.name} cannot reach target_macs={target:.3f} on {spec.label}: its "
            f"reachable range is {lowest:.3f}..{highest:.3f} of the unpruned MACs"
        )
    return options[min(range(len(options)), key=lambda i: abs(ratios[i] - target))]


def _native_schedule(method: Method, spec: ModelSpec) -> list[int]:
    """The schedule a settled method's own knobs give on `spec` (a block method's on a VLM:
    its vision tower's, which the VLM's geometry describes)."""
    if isinstance(spec, VLMSpec) and isinstance(method, VisualMethod):
        return visual_schedule(method, spec)
    return method.knob_schedule(spec)


def check_schedule(spec: ModelSpec, schedule: list[int]) -> None:
    """Raise ValueError unless `schedule` is a valid per-block token budget for `spec`."""
    if len(schedule) != spec.depth:
        raise ValueError(f"schedule has {len(schedule)} entries, the model has {spec.depth} blocks")
    tokens = spec.tokens
    for index, keep in enumerate(schedule):
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise ValueError(f"schedule entry {index} must be an int, got {keep!r}")
        if keep > tokens:
            raise ValueError(
                f"schedule must not increase: block {index} keeps {keep} tokens after {tokens}"
            )
        if keep <= spec.protected:
            raise ValueError(
                f"schedule block {index} keeps {keep} tokens: at least one more than the "
                f"{spec.protected} protected tokens must remain"
            )
        tokens = keep
