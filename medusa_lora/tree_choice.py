"""The one place a tree request is resolved: ``generate()``, the eval and the server all call ``choose_tree``.

A request is a ``TokenTree`` (used as given), a node count (the default tree of that size), ``"auto"``
(the calibrated tree with the most expected tokens per second on this device, see ``tree_tuning``) or
None (the tree saved at calibration, else the 16-node default). Step costs are measured once per model
and kept here, keyed weakly by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from medusa_lora.errors import ConfigError
from medusa_lora.model import MedusaLoraModel
from medusa_lora.tree import TokenTree, calibrated_tree, default_tree
from medusa_lora.tree_tuning import DEFAULT_SIZES, measure_step_costs, predicted_tokens_per_step

DEFAULT_TREE_SIZE = 16
# Trees whose expected tok/s is within this fraction of the fastest are a tie: step costs measured on a CPU
# differ by a few percent from run to run, and of tied trees the one accepting the most tokens wins.
CLOSE_RATE = 0.03
ROOT_ONLY = TokenTree([])
TreeRequest = TokenTree | int | str | None
TreeSetting = int | str  # what a user names: a default tree's node count, "calibrated" or "auto"

_STEP_COSTS: WeakKeyDictionary[MedusaLoraModel, dict[TokenTree, float]] = WeakKeyDictionary()
_CANDIDATES: WeakKeyDictionary[MedusaLoraModel, tuple[TreeCandidate, ...]] = WeakKeyDictionary()


@dataclass(frozen=True)
class TreeCandidate:
    """A tree ``"auto"`` weighed: the tokens per step calibration predicts for it, its step's measured cost
    relative to plain decoding's, and their ratio, the speedup over plain decoding it is expected to give."""

    tree: TokenTree
    predicted_tokens_per_step: float
    relative_step_cost: float

    @property
    def expected_speedup(self) -> float:
        return self.predicted_tokens_per_step / self.relative_step_cost

    def to_dict(self) -> dict[str, float | int]:
        return {
            "nodes": self.tree.size,
            "predicted_tokens_per_step": self.predicted_tokens_per_step,
            "relative_step_cost": self.relative_step_cost,
            "expected_speedup": self.expected_speedup,
        }


@dataclass(frozen=True)
class TreeChoice:
    """A tree, where it came from, the tokens per step its hit rates predict, a note for the reader, and (for
    ``"auto"``) every tree it was chosen from."""

    tree: TokenTree
    source: str  # "tuned" (for this device), "calibrated" (saved at training), "default", "given"
    predicted_tokens_per_step: float | None = None
    note: str | None = None
    candidates: tuple[TreeCandidate, ...] = ()

    @property
    def label(self) -> str:
        where = {
            "tuned": "calibrated tree sized for this device by measured step costs",
            "calibrated": "calibrated tree saved at training",
            "default": "default tree",
            "given": "tree given by the caller",
        }[self.source]
        return f"tree of {self.tree.size} nodes ({where})"


def tree_setting(value: int | str) -> TreeSetting:
    """``value`` as a ``TreeSetting`` (a node count given as text becomes an int), checked before any model is
    loaded: the one rule behind every ``--tree`` option and the server's adapters."""
    if value in ("auto", "calibrated"):
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"tree must be a node count >= 1, 'auto' or 'calibrated', got {value!r}")
    return value


def choose_tree(model: MedusaLoraModel, request: TreeRequest = None, min_nodes: int = 1) -> TreeChoice:
    """Resolve ``request`` for ``model``'s heads: a ``TokenTree``, a node count (a default tree), None or
    ``"calibrated"`` (the tree saved at training, else the default), or ``"auto"`` (the calibrated tree
    fastest on this device). ``min_nodes=2`` never returns plain decoding (with ``"auto"``, the best tree of
    >= 2 nodes, and a note when plain decoding was predicted faster)."""
    num_heads = model.config.num_heads
    if isinstance(request, TokenTree):
        choice = TreeChoice(request, "given")
    elif isinstance(request, int) and not isinstance(request, bool):
        if request < min_nodes:
            raise ConfigError(f"a tree needs at least {min_nodes} node(s), got {request}")
        choice = TreeChoice(default_tree(request, num_heads), "default")
    elif request == "auto" and model.config.hit_rates:
        return _tuned(model, min_nodes)
    elif request in (None, "calibrated", "auto"):
        if model.config.tree:
            choice = TreeChoice(TokenTree(model.config.tree), "calibrated")
        else:
            choice = TreeChoice(default_tree(DEFAULT_TREE_SIZE, num_heads), "default")
    else:
        raise ConfigError(
            f"tree must be a TokenTree, a node count, 'auto', 'calibrated' or None, got {request!r}"
        )
    return TreeChoice(choice.tree, choice.source, predicted_tokens_per_step(model, choice.tree))


def _tuned(model: MedusaLoraModel, min_nodes: int) -> TreeChoice:
    weighed = tree_candidates(model)
    plain = next(c for c in weighed if c.tree == ROOT_ONLY)
    candidates = [c for c in weighed if c.tree.size >= min_nodes]
    fastest = max(c.expected_speedup for c in candidates)
    close = [c for c in candidates if c.expected_speedup >= fastest * (1 - CLOSE_RATE)]
    best = max(close, key=lambda c: (c.predicted_tokens_per_step, -c.tree.size))
    note = None
    if best.tree.size > 1 and plain.expected_speedup > best.expected_speedup:
        note = (
            f"plain decoding was predicted {plain.expected_speedup / best.expected_speedup:.2f}x as fast as "
            "this tree on this device (from the heads' calibrated hit rates and measured step costs)"
        )
    return TreeChoice(best.tree, "tuned", best.predicted_tokens_per_step, note, weighed)


def tree_candidates(model: MedusaLoraModel) -> tuple[TreeCandidate, ...]:
    """Plain decoding and each calibrated tree size, with what calibration predicts and this device's measured
    step costs (``step_costs``) say of them: worked out once per model (a ``generate(tree="auto")`` call reads
    them, and walking 15 trees over the calibration's completions takes ~25 ms on a 2-core CPU)."""
    if model not in _CANDIDATES:
        costs = step_costs(model)
        plain = costs[ROOT_ONLY]
        _CANDIDATES[model] = tuple(
            TreeCandidate(tree, predicted_tokens_per_step(model, tree) or 1.0, cost / plain)
            for tree, cost in costs.items()
        )
    return _CANDIDATES[model]


def step_costs(model: MedusaLoraModel) -> dict[TokenTree, float]:
    """Seconds per generation step with plain decoding and each calibrated tree size, measured on first use."""
    if model not in _STEP_COSTS:
        hit_rates = model.config.hit_rates
        trees = [ROOT_ONLY, *(calibrated_tree(hit_rates, size) for size in DEFAULT_SIZES if size > 1)]
        measured = measure_step_costs(model, list(dict.fromkeys(trees)))
        _STEP_COSTS[model] = {tree: cost.total for tree, cost in measured.items()}
    return _STEP_COSTS[model]


def relative_step_cost(model: MedusaLoraModel, tree: TokenTree) -> float | None:
    """``tree``'s measured step cost over plain decoding's on this device, if the tuning has weighed it
    (``tree_candidates``: trees chosen with ``"auto"``); else None."""
    return next((c.relative_step_cost for c in _CANDIDATES.get(model, ()) if c.tree == tree), None)
