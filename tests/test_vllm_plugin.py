"""The vLLM plugin's own parts, without vLLM: its chain is our drafter's top-1 path for every kind of heads, it
finds each request's row in a forward, and it drafts each request with the heads of its adapter. With vLLM
installed, vLLM's own custom-class loader builds the proposer (skipped where ``import vllm`` fails: CI)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medusa_lora.drafting.heads import HeadDrafter, top1_chain
from medusa_lora.errors import ConfigError
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import MedusaLoraModel
from medusa_lora.serving import vllm_plugin
from medusa_lora.serving.vllm_plugin import PROPOSER, ForwardStep, MedusaLoraProposer, draft_rows
from medusa_lora.trees.tree import chain_tree

from conftest import TINY_VOCAB, randomize_heads, tiny_llama

HEAD_KINDS = [
    {},
    {"root_conditioned": True},
    {"path_conditioned": True},
    {"path_conditioned": True, "separate_lm_head": True},
]


def heads_model(kind: dict, draft: bool, seed: int = 1) -> MedusaLoraModel:
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4, **kind))
    randomize_heads(model, seed)
    if draft:
        model.set_draft_vocab(torch.randperm(TINY_VOCAB, generator=torch.Generator().manual_seed(2))[:30])
    return model.eval()


def positions_and_roots(model: MedusaLoraModel) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = model.hidden_states(ids)[0, :-1]
    return hidden, ids[0, 1:]  # every position's hidden state, and its next token as the root


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("draft", [False, True])
def test_the_chain_is_our_drafters_top1_path(kind, draft):
    model = heads_model(kind, draft)
    hidden, roots = positions_and_roots(model)
    embeddings = model.causal_lm.get_input_embeddings()
    with torch.no_grad():
        chains = top1_chain(model.heads, hidden, roots, embeddings, model.lm_head, 3)
        assert chains.shape == (len(roots), 3)
        for h, root, chain in zip(hidden, roots, chains):
            head_logits = model.draft_logits(h, root, depth=3)
            candidates, _ = HeadDrafter(model.heads).draft(head_logits, [], chain_tree(3))
            assert torch.equal(candidates[:, 0], chain)  # what generate() verifies on its top-1 path
        if model.heads.conditioning_tokens > 1:  # they read the chain's own tokens: teacher forcing agrees
            forced = model.heads.draft_logits(hidden, roots, embeddings, model.lm_head, path_ids=chains)
            assert torch.equal(model.heads.token_ids(forced[:3].argmax(-1)).T, chains)


def test_draft_rows_find_the_hidden_state_of_each_last_sampled_token():
    # a last prefill chunk (positions 0..4), a decode of root + 4 drafts at positions 10..14 that accepted 2
    # (3 sampled: the sequence went from 11 to 14 tokens), and a prefill chunk before its last (nothing sampled)
    positions = torch.tensor([0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 0, 1, 2])
    starts = torch.tensor([0, 5, 10, 13])
    rows = draft_rows(starts, positions, [6, 14, 0], [[7], [8, 9, 10], []])
    assert rows == [4, 7, None]  # position 4 of the first; position 12 of the second (its 2nd draft)
    with pytest.raises(RuntimeError, match="not from this forward"):
        draft_rows(starts, positions, [6, 20, 0], [[7], [8], []])


def fake_vllm_config(heads, depth: int = 3, max_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(
        additional_config={vllm_plugin.HEADS_KEY: heads},
        speculative_config=SimpleNamespace(num_speculative_tokens=depth, model=PROPOSER),
        model_config=SimpleNamespace(dtype=torch.float32, max_model_len=max_len),
    )


def test_the_proposer_drafts_each_request_with_its_adapters_heads(tmp_path):
    """Two heads dirs on one base: requests of LoRA 1 and 2 draft with their own heads, others get no drafts;
    vLLM's target model is stood in for by the transformers one (the same embed_tokens / lm_head names)."""
    models = [heads_model({"path_conditioned": True}, True, seed) for seed in (1, 2)]
    for i, model in enumerate(models):
        model.save_pretrained(tmp_path / str(i))
    proposer = MedusaLoraProposer(fake_vllm_config({"1": str(tmp_path / "0"), "2": str(tmp_path / "1")}))
    proposer.load_model(models[0].causal_lm)
    hidden, roots = positions_and_roots(models[0])
    # 4 requests decoding one token each at positions 4..7 (rows 0..3), adapters 1, 2, none, 1
    proposer.step = ForwardStep(hidden[4:8], torch.arange(4, 8), torch.arange(5), torch.tensor([1, 2, 0, 1]))
    sampled = [[int(r)] for r in roots[4:8]]
    drafts = proposer.propose(sampled, np.arange(6, 10), np.zeros((4, 64), dtype=np.int64))
    embeddings = models[0].causal_lm.get_input_embeddings()
    with torch.no_grad():
        expect = [top1_chain(m.heads, hidden, roots, embeddings, m.lm_head, 3)[4:8].tolist() for m in models]
    assert drafts == [expect[0][0], expect[1][1], [], expect[0][3]]
    assert drafts[0] != drafts[1] or expect[0][1] != expect[1][1]  # the heads differ


def test_the_proposer_refuses_missing_config_and_too_deep_chains(tmp_path):
    with pytest.raises(ConfigError, match="additional_config"):
        MedusaLoraProposer(SimpleNamespace(additional_config={}))
    with pytest.raises(ConfigError, match="LoRA ids"):
        MedusaLoraProposer(fake_vllm_config({"task": "dir"}))
    heads_model({}, False).save_pretrained(tmp_path / "heads")
    proposer = MedusaLoraProposer(fake_vllm_config(str(tmp_path / "heads"), depth=5))
    with pytest.raises(ConfigError, match="num_speculative_tokens 5 > the 4 heads"):
        proposer.load_model(tiny_llama())


def test_vllms_custom_class_loader_builds_the_proposer(tmp_path):
    pytest.importorskip("vllm")
    from vllm.config.speculative import SpeculativeConfig
    from vllm.v1.spec_decode.custom_class_proposer import create_custom_proposer

    assert SpeculativeConfig._is_custom_proposer_path(PROPOSER)  # "model": PROPOSER means custom_class
    heads_model({}, False).save_pretrained(tmp_path / "heads")
    proposer = create_custom_proposer(fake_vllm_config(str(tmp_path / "heads")))
    assert isinstance(proposer, MedusaLoraProposer)
