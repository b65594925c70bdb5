"""Fitting a target profile's artifacts to its memory budget.

The budget is what `rgexport validate` checks a bundle against: the peak RSS of a fresh process that loads
an artifact and decodes the validation tokens (`bundle.memory_of`; where this machine has only a stand-in for
the artifact's runtime, Core ML off macOS, an estimate: the artifact's bytes plus its state's). Before
anything is built, a recipe that cannot fit is passed over: every recipe stores each weight in at least
`RECIPE_BITS` bits (more where a backend counts its scales: ExecuTorch int4's XNNPACK weights carry a bf16
scale per 32, 4.5 bits), so parameters x bits / 8 is a lower bound of what decoding holds; the tied embedding
table counts as often as the backend stores it (ExecuTorch int4 keeps the head and a gather table beside it,
0.78 GB at RecurrentGemma-2B in 4 bits with their scales, 1.3 GB in int8, where one 4-bit copy would be
0.33 GB); and a runtime that packs its own copy of the weights while it still holds the artifact's counts both
(ExecuTorch with XNNPACK: 3.26 GB at least at 2B, 4.00 GB measured). After a build,
the measured peak decides. When the profile's recipe does not fit, the next candidate is the backend's most
precise recipe with fewer bits; it must also pass the quality budget (`[quality_budget]`, the accuracy
matrix's rule) against the fp32 reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rgexport.backends.base import RECIPE_BITS, Backend
from rgexport.config import GriffinConfig

MB = 1e6  # profiles give budgets in MB (10^6 bytes), as `rgexport validate` reports them


def parameter_count(config: GriffinConfig) -> int:
    from rgexport.streaming import block_weight_bytes

    return sum(block_weight_bytes(config).values()) // 4


def weights_lower_bound(config: GriffinConfig, recipe: str, backend: Backend | None = None,
                        options: dict[str, Any] | None = None) -> int:
    """Bytes that `recipe`'s weights take at the least: every parameter at the recipe's bits (with its scales
    where the backend knows them: `Backend.weight_bits`), and the tied embedding table as often and as wide as
    `backend` stores it (`Backend.table_copies_bits`; once at the recipe's bits where no backend is given)."""
    return _bounds(config, recipe, backend, options)[0]


def memory_lower_bound(config: GriffinConfig, recipe: str, backend: Backend | None = None,
                       options: dict[str, Any] | None = None) -> int:
    """Bytes a process running `recipe` holds at its peak, at the least: its weights (`weights_lower_bound`)
    and any copy the runtime packs while those are still held (`Backend.packed_at_load_bits`)."""
    return _bounds(config, recipe, backend, options)[1]


def _bounds(config: GriffinConfig, recipe: str, backend: Backend | None,
            options: dict[str, Any] | None) -> tuple[int, int]:
    """(weights, peak) lower bounds in bytes, from one meta model (`block_weight_bytes`)."""
    from rgexport.streaming import block_weight_bytes

    parts = block_weight_bytes(config)  # float32 bytes per part
    total, table = sum(parts.values()) // 4, parts["embedder"] // 4

    def size(bits: float, table_bits: float) -> int:
        return int((total - table) * bits + table * table_bits) // 8

    if backend is None:
        bits = RECIPE_BITS[recipe]
        return size(bits, bits), size(bits, bits)
    options = options or {}
    weights = size(backend.weight_bits(recipe, options), sum(backend.table_copies_bits(recipe, options)))
    return weights, weights + size(*backend.packed_at_load_bits(recipe, options))


def fallbacks(backend: Backend, asked: str) -> list[str]:
    """The recipes tried after `asked`, in order: fewer bits than it, most precise first (the backend's
    recipe order breaks ties)."""
    order = list(backend.recipes)
    smaller = [r for r in order if RECIPE_BITS[r] < RECIPE_BITS[asked]]
    return sorted(smaller, key=lambda r: (-RECIPE_BITS[r], order.index(r)))


@dataclasses.dataclass
class RecipeChoice:
    """Why an artifact of a bundle has the recipe it has: what the profile asked for, what was built, and
    one sentence per recipe passed over."""

    backend: str
    asked: str
    built: str | None = None
    passed_over: list[str] = dataclasses.field(default_factory=list)
    # Whether a smaller recipe's quality against float32 was judged (None: the profile's recipe, not checked);
    # False where the build judges by the own quantised model instead (random weights, --no-judge-quality).
    quality_judged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan(backend: Backend, asked: str, config: GriffinConfig, budget_mb: float | None,
         choice: RecipeChoice, options: dict[str, Any] | None = None) -> list[str]:
    """The recipes to try for one artifact, in order, after the lower-bound check (recorded in `choice`);
    an RgexportError naming the smallest recipe's size when none can fit."""
    from rgexport.errors import RgexportError

    tries = [asked, *fallbacks(backend, asked)]
    if budget_mb is None:
        return [asked]
    fitting, needs = [], {}
    for r in tries:
        weights, peak = _bounds(config, r, backend, options)
        needs[r] = _needs(weights, peak)
        if peak > budget_mb * MB:
            choice.passed_over.append(f"{r}: {needs[r]}, over the {budget_mb:g} MB budget")
        else:
            fitting.append(r)
    if not fitting:
        smallest = tries[-1]
        raise RgexportError(
            f"no {backend.name} recipe fits the {budget_mb:g} MB memory budget: the smallest, {smallest}, "
            f"{needs[smallest]}. For a device with more memory, raise the budget (--memory-budget MB, or "
            f"memory_budget_mb in a copy of the profile); otherwise choose a smaller model")
    return fitting


def _needs(weights: int, peak: int) -> str:
    if peak == weights:
        return f"needs at least {weights / MB:,.0f} MB for its weights"
    return (f"needs at least {peak / MB:,.0f} MB while it loads: {weights / MB:,.0f} MB of weights and the "
            f"{(peak - weights) / MB:,.0f} MB its runtime packs from them while it still holds them")


def within_quality_budget(report: Any) -> tuple[bool, str]:
    """Whether a validation report meets [quality_budget], and the figures that say so."""
    from rgexport.evaluate import quality_budget

    b = quality_budget()
    m = report.metrics
    ok = m["ppl_ratio"] <= b["max_ppl_ratio"] and m["top1_agreement"] >= b["min_top1_agreement"]
    return ok, (f"perplexity x{m['ppl_ratio']:.3f} (budget x{b['max_ppl_ratio']:g}), top-1 "
                f"{100 * m['top1_agreement']:.1f}% (budget {100 * b['min_top1_agreement']:.0f}%)")
