"""Per-block budgets in one format for every method (tokens left after each block), and the
analytic MACs model used to compare them and to resolve `target_macs`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from tokcomp.methods import Layout, Method


@dataclass(frozen=True)
class ModelSpec(Layout):
    """The shape of a model as far as MACs and schedules go (from its adapter).

    name identifies the architecture; width is the residual width, attn_dim the
    q/k/v width, mlp_hidden the MLP hidden width; stem_macs and head_macs are the MACs
    outside the blocks (patch embedding, classifier or pooling head).
    """

    name: str
    width: int
    heads: int
    attn_dim: int
    mlp_hidden: int
    stem_macs: int
    head_macs: int

    #: Fields a saved config must match besides Config's common ones (subclasses add theirs).
    checked: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict:
        return asdict(self)

    def model_macs(self, schedule: list[int] | None = None) -> int:
        """MACs of one image through the model under `schedule` (None: unpruned)."""
        schedule = schedule if schedule is not None else [self.tokens] * self.depth
        total, tokens = self.stem_macs + self.head_macs, self.tokens
        for keep in schedule:
            total += block_macs(self, tokens, keep)
            tokens = keep
        return total

    def native_schedule(self, method: Method) -> list[int]:
        """The schedule a settled method's own knobs give on this model."""
        return method.knob_schedule(self)

    def resolve(self, method: Method) -> tuple[Method, list[int]]:
        """The method with its knobs settled, and its schedule on this model.

        An explicit `schedule` is taken as is; a `target_macs` picks the method's candidate
        whose MACs are nearest (the error names the reachable range); otherwise the native
        knobs decide.
        """
        method = method.settle(self)
        if method.schedule is not None:
            schedule = list(method.schedule)
        elif method.target_macs is not None:
            method, schedule = self.nearest_to_target(method)
        else:
            schedule = self.native_schedule(method)
        check_schedule(self, schedule)
        method.check_schedule(self, schedule)
        return method, schedule

    def nearest_to_target(self, method: Method) -> tuple[Method, list[int]]:
        """The candidate of `method` whose MACs ratio is nearest its `target_macs`."""
        options = [(c, self.native_schedule(c)) for c in method.candidates(self)]
        base = self.model_macs()
        ratios = [self.model_macs(schedule) / base for _, schedule in options]
        target, lowest, highest = method.target_macs, min(ratios), max(ratios)
        if not lowest - 0.005 <= target <= highest + 0.005:
            raise ValueError(
                f"{method.name} cannot reach target_macs={target:.3f} on {self.label}: its "
                f"reachable range is {lowest:.3f}..{highest:.3f} of the unpruned MACs"
            )
        return options[min(range(len(options)), key=lambda i: abs(ratios[i] - target))]

    @property
    def label(self) -> str:
        """How error messages name this model."""
        return self.name


def block_macs(spec: ModelSpec, tokens_in: int, tokens_out: int) -> int:
    """MACs of one block: attention at the incoming token count, MLP at the reduced one."""
    projections = 4 * tokens_in * spec.width * spec.attn_dim
    attention = 2 * tokens_in * tokens_in * spec.attn_dim
    mlp = 2 * tokens_out * spec.width * spec.mlp_hidden
    return projections + attention + mlp


def model_macs(spec: ModelSpec, schedule: list[int] | None = None) -> int:
    """MACs of one image through the model under `schedule` (None: unpruned)."""
    return spec.model_macs(schedule)


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


def resolve(method: Method, spec: ModelSpec) -> tuple[Method, list[int]]:
    """The method with its knobs settled, and its schedule on `spec` (see ModelSpec.resolve)."""
    return spec.resolve(method)
