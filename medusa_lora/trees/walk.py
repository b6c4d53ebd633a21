"""How many tokens a greedy step is expected to emit with a tree, from the heads' calibration."""

from __future__ import annotations

from collections.abc import Sequence

from medusa_lora.trees.tree import Path, TokenTree, hit_rate


def expected_accepted_length(tree: TokenTree, hit_rates: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step: 1 (the base model's own token) + the chance each node is accepted.

    ``hit_rates[k][r]`` is the measured probability that head k's rank-r candidate is the right token
    (given the earlier tokens are right); heads are treated as independent.
    """
    total = 1.0
    for path in tree.paths:
        prob = 1.0
        for head, rank in enumerate(path):
            prob *= hit_rate(hit_rates, head, rank)
        total += prob
    return total


def walked_accepted_length(tree: TokenTree, greedy_ranks: Sequence[str]) -> float:
    """Tokens per step that greedy generation with ``tree`` emits on the calibration's completions, walked step
    by step as ``generate()`` goes (the prefill's token is not a step).

    ``greedy_ranks`` holds one string per completion of n tokens, n words separated by spaces (see
    ``MedusaConfig.greedy_ranks``): word i is for the step whose root is token i, its j-th digit the rank of
    token i + j + 1 among head j's candidates, up to the first miss. A step accepts the longest prefix of its
    word that is a node of the tree and emits it plus one token (the last step no further than the end), and
    the next step starts at the token after them. Unlike ``expected_accepted_length``, which averages over
    every position, the walk visits positions as generation does: stretches the heads draft badly take many
    steps, stretches they draft well few.
    """
    tokens = steps = 0
    for completion in greedy_ranks:
        words = completion.split(" ")
        position = 0
        while position < len(words) - 1:
            path: Path = ()
            for digit in words[position]:
                if path + (int(digit),) not in tree:
                    break
                path += (int(digit),)
            emitted = min(len(path) + 1, len(words) - 1 - position)
            tokens += emitted
            steps += 1
            position += emitted
    return tokens / steps if steps else 1.0
