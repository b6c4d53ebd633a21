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


@dataclass(frozen=True)
class TreeChoice:
    """A tree, where it came from, the tokens per step its hit rates predict, and a note for the reader."""

    tree: TokenTree
    source: str  # "tuned" (for this device), "calibrated" (saved at training), "default", "given"
    predicted_tokens_per_step: float | None = None
    note: str | None = None

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
    costs = step_costs(model)
    tokens = {tree: predicted_tokens_per_step(model, tree) or 1.0 for tree in costs}  # per step
    rate = {tree: tokens[tree] / cost for tree, cost in costs.items()}  # expected tokens per second
    candidates = [tree for tree in costs if tree.size >= min_nodes]
    fastest = max(rate[tree] for tree in candidates)
    close = [tree for tree in candidates if rate[tree] >= fastest * (1 - CLOSE_RATE)]
    best = max(close, key=lambda tree: (tokens[tree], -tree.size))
    note = None
    if best.size > 1 and rate[ROOT_ONLY] > rate[best]:
        note = (
            f"plain decoding was predicted {rate[ROOT_ONLY] / rate[best]:.2f}x as fast as this tree on this "
            "device (from the heads' calibrated hit rates and measured step costs)"
        )
    return TreeChoice(best, "tuned", predicted_tokens_per_step(model, best), note)


def step_costs(model: MedusaLoraModel) -> dict[TokenTree, float]:
    """Seconds per generation step with plain decoding and each calibrated tree size, measured on first use."""
    if model not in _STEP_COSTS:
        hit_rates = model.config.hit_rates
        trees = [ROOT_ONLY, *(calibrated_tree(hit_rates, size) for size in DEFAULT_SIZES if size > 1)]
        measured = measure_step_costs(model, list(dict.fromkeys(trees)))
        _STEP_COSTS[model] = {tree: cost.total for tree, cost in measured.items()}
    return _STEP_COSTS[model]


def relative_step_cost(model: MedusaLoraModel, tree: TokenTree) -> float | None:
    """``tree``'s measured step cost over plain decoding's on this device, if ``step_costs`` has measured it
    (trees chosen with ``"auto"``); else None."""
    costs = _STEP_COSTS.get(model)
    if costs is None or tree not in costs:
        return None
    return costs[tree] / costs[ROOT_ONLY]
