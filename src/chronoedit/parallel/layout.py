"""How the ranks of one edit share the work: CFG branches over rank groups, then the token sequence over the ranks
of a group (Ulysses all-to-all over heads, ring attention over the rest).

``world = cfg * ring * ulysses``. Ranks are numbered ``rank = (c * ring + r) * ulysses + u``: the ranks of one Ulysses
group are neighbours (one node, the fastest links), a ring spans Ulysses groups, and the two CFG groups are the two
halves. Pure arithmetic: checked before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError


@dataclass(frozen=True)
class Layout:
    """``cfg`` (1 or 2) CFG rank groups, each splitting the sequence over ``ring * ulysses`` ranks."""

    cfg: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def sequence(self) -> int:
        """Ranks that share one branch's token sequence."""
        return self.ring * self.ulysses

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(cfg group, ring index, ulysses index) of ``rank``."""
        return rank // self.sequence, (rank // self.ulysses) % self.ring, rank % self.ulysses

    def describe(self) -> str:
        """One line for the user, e.g. ``context parallel on 4 ranks: CFG branches on 2 groups x Ulysses 2``."""
        parts = []
        if self.cfg > 1:
            parts.append("CFG branches on 2 groups")
        if self.ulysses > 1:
            parts.append(f"Ulysses {self.ulysses}")
        if self.ring > 1:
            parts.append(f"ring {self.ring}")
        return f"context parallel on {self.world} ranks: " + (" x ".join(parts) or "one rank")


def choose_layout(
    world: int,
    heads: int,
    cfg_parallel: bool = False,
    ulysses: int | None = None,
    ring: int | None = None,
) -> Layout:
    """The layout for ``world`` ranks and a transformer with ``heads`` attention heads. Unset degrees are chosen:
    the largest Ulysses degree that divides both the ranks left and the heads, ring for the rest (always valid).
    UserError (naming the flag) for a layout that cannot run."""
    if world < 1:
        raise UserError(f"context parallel needs at least one rank, got {world}")
    for name, value in (("ulysses_degree", ulysses), ("ring_degree", ring)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{{{name}}} must be a whole number of at least 1, got {value!r}", name)
    cfg = 2 if cfg_parallel else 1
    if world % cfg:
        raise UserError(f"{{cfg_parallel}} needs an even number of ranks, got {world}", "cfg_parallel")
    sequence = world // cfg
    if ulysses is None and ring is None:
        ulysses = max(d for d in range(1, sequence + 1) if sequence % d == 0 and heads % d == 0)
    if ulysses is None:
        ulysses = sequence // ring if ring and sequence % ring == 0 else 0
    if ring is None:
        ring = sequence // ulysses if ulysses and sequence % ulysses == 0 else 0
    layout = Layout(cfg=cfg, ring=ring, ulysses=ulysses)
    if not ring or not ulysses or layout.world != world:
        shown = "CFG 2 x " if cfg_parallel else ""
        raise UserError(f"{world} ranks cannot be split as {shown}ulysses {ulysses or '?'} x ring {ring or '?'}: "
                        f"the degrees must multiply to {world}")  # fmt: skip
    if heads % layout.ulysses:
        raise UserError(f"{{ulysses_degree}} {layout.ulysses} does not divide the model's {heads} attention heads "
                        f"(use a divisor of {heads}, and {{ring_degree}} for the rest)", "ulysses_degree")  # fmt: skip
    return layout


def check_guidance(layout: Layout | None, guidance_scale: float) -> None:
    """CFG-parallel runs the two guidance branches on two rank groups: an edit without guidance has one branch."""
    if layout is not None and layout.cfg > 1 and guidance_scale <= 1.0:
        raise UserError(f"{{cfg_parallel}} splits the two classifier-free-guidance branches over the ranks, but this "
                        f"edit has no guidance ({{guidance_scale}} {guidance_scale:g}): drop {{cfg_parallel}}",
                        "cfg_parallel", ("guidance_scale",))  # fmt: skip
