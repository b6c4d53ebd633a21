"""The one place a tree request (``TreeSpec``) is resolved: ``generate()``, the eval and the server all call
``choose_tree``.

A request is a ``TokenTree`` (used as given), a node count (the default tree of that size), ``"auto"``
(the calibrated tree with the most expected tokens per second on this device, ``tuning``) or None /
``"calibrated"`` (the tree saved at calibration, else the 16-node default). The tuning is done once per model
and kept here, keyed weakly by the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from weakref import WeakKeyDictionary

from medusa_lora.errors import ConfigError
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.trees.tree import ROOT_ONLY, TokenTree, calibrated_tree, default_tree
from medusa_lora.trees.tuning import DEFAULT_SIZES, measure_step_costs, predicted_tokens_per_step

DEFAULT_TREE_SIZE = 16
# Trees whose expected tok/s is within this fraction of the fastest are a tie: step costs measured on a CPU
# differ by a few percent from run to run, and of tied trees the one accepting the most tokens wins.
CLOSE_RATE = 0.03
# What a tree request may be: a tree, a default tree's node count, "auto", "calibrated" or None (= "calibrated")
TreeSpec = TokenTree | int | str | None

_CHOICES: WeakKeyDictionary[MedusaLoraModel, tuple[TreeChoice, ...]] = WeakKeyDictionary()


@dataclass(frozen=True)
class TreeChoice:
    """A tree for a request: where it came from, the tokens per step calibration predicts for it, and, for trees
    tuned on this device, its step's measured cost relative to plain decoding's; with ``"auto"``, ``candidates``
    holds every tree it was chosen from (plain decoding among them), and ``note`` a word for the reader."""

    tree: TokenTree
    source: str  # "tuned" (for this device), "calibrated" (saved at training), "default", "given"
    predicted_tokens_per_step: float | None = None
    relative_step_cost: float | None = None
    note: str | None = None
    candidates: tuple[TreeChoice, ...] = ()

    @property
    def expected_speedup(self) -> float | None:
        """Predicted tokens per step over relative step cost: the speedup over plain decoding it should give."""
        if self.predicted_tokens_per_step is None or self.relative_step_cost is None:
            return None
        return self.predicted_tokens_per_step / self.relative_step_cost

    @property
    def label(self) -> str:
        where = {
            "tuned": "calibrated tree sized for this device by measured step costs",
            "calibrated": "calibrated tree saved at training",
            "default": "default tree",
            "given": "tree given by the caller",
        }[self.source]
        return f"tree of {self.tree.size} nodes ({where})"

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "nodes": self.tree.size,
            "predicted_tokens_per_step": self.predicted_tokens_per_step,
            "relative_step_cost": self.relative_step_cost,
            "expected_speedup": self.expected_speedup,
        }


def parse_tree_spec(value: int | str) -> int | str:
    """A tree request a user names (a node count, as text or int, ``"auto"`` or ``"calibrated"``), checked
    before any model is loaded: the one rule behind every ``--tree`` option and the server's adapters."""
    if value in ("auto", "calibrated"):
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"tree must be a node count >= 1, 'auto' or 'calibrated', got {value!r}")
    return value


def choose_tree(model: MedusaLoraModel, request: TreeSpec = None, min_nodes: int = 1) -> TreeChoice:
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
    weighed = tuned_candidates(model)
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
    return replace(best, note=note, candidates=weighed)


def tuned_candidates(model: MedusaLoraModel) -> tuple[TreeChoice, ...]:
    """Plain decoding and a calibrated tree of each size in ``tuning.DEFAULT_SIZES``, with the tokens per step
    calibration predicts and this device's measured step cost relative to plain decoding's: measured once per
    model, on first use (a ``generate(tree="auto")`` call then only reads them)."""
    if model not in _CHOICES:
        hit_rates = model.config.hit_rates
        trees = [ROOT_ONLY, *(calibrated_tree(hit_rates, size) for size in DEFAULT_SIZES if size > 1)]
        costs = measure_step_costs(model, list(dict.fromkeys(trees)))
        plain = costs[ROOT_ONLY].total
        _CHOICES[model] = tuple(
            TreeChoice(tree, "tuned", predicted_tokens_per_step(model, tree) or 1.0, cost.total / plain)
            for tree, cost in costs.items()
        )
    return _CHOICES[model]


def relative_step_cost(model: MedusaLoraModel, tree: TokenTree) -> float | None:
    """``tree``'s measured step cost over plain decoding's on this device, if the tuning has weighed it
    (``tuned_candidates``: trees chosen with ``"auto"``); else None."""
    return next((c.relative_step_cost for c in _CHOICES.get(model, ()) if c.tree == tree), None)
