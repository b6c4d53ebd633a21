"""Foundation: heads, the LoRA wrapper, save/load round-trips and the errors for bad input."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from transformers import DynamicCache

from medusa_lora.errors import CheckpointError, ConfigError, IncompatibleBaseModelError
from medusa_lora.model.base import cache_argument
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.heads import PATH_TABLES, MedusaHeads
from medusa_lora.model.wrapper import HEADS_FILE, MedusaLoraModel
from medusa_lora.trees.tree import TokenTree

from conftest import TINY_VOCAB, tiny_llama, tiny_mistral, tiny_qwen2

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def randomise_heads(model: MedusaLoraModel, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(0, 0.05)


@pytest.mark.parametrize("num_heads,num_layers", [(1, 1), (4, 1), (3, 2), (2, 0)])
def test_head_logits_shapes(num_heads, num_layers):
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=num_heads, num_layers=num_layers))
    out = model(torch.randint(0, TINY_VOCAB, (2, 7)))
    assert out.logits.shape == (2, 7, TINY_VOCAB)
    assert out.head_logits.shape == (num_heads, 2, 7, TINY_VOCAB)
    assert out.hidden_states.shape == (2, 7, 64)


@pytest.mark.parametrize("separate", [False, True])
def test_fresh_heads_reproduce_the_base_next_token_distribution(separate):
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=3, separate_lm_head=separate))
    out = model(torch.randint(0, TINY_VOCAB, (1, 9)))
    for k in range(3):
        torch.testing.assert_close(out.head_logits[k], out.logits, rtol=1e-5, atol=1e-6)  # BLAS blocking only


def test_trained_heads_differ_from_the_base():
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2))
    randomise_heads(model)
    out = model(torch.randint(0, TINY_VOCAB, (1, 5)))
    assert not torch.allclose(out.head_logits[0], out.logits)


def test_lora_only_wraps_and_changes_the_targeted_modules():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = MedusaLoraModel.from_base(copy.deepcopy(base), lora_config=LORA)
    wrapped = {
        name.rsplit(".", 1)[-1] for name, m in model.causal_lm.named_modules() if isinstance(m, LoraLayer)
    }
    assert wrapped == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(0, TINY_VOCAB, (1, 6))
    assert not torch.allclose(model(ids).logits, base(ids).logits)  # the (non-zero) LoRA acts
    with model.base.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in model.base.state_dict().items()
        if "lora_" not in k
    }
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_root_conditioned_heads_start_as_plain_heads_then_see_the_next_token(tmp_path):
    base = tiny_llama()
    plain = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=2))
    conditioned = MedusaLoraModel.from_base(
        copy.deepcopy(base), MedusaConfig(num_heads=2, root_conditioned=True)
    )
    ids = torch.randint(0, TINY_VOCAB, (2, 7))
    torch.testing.assert_close(conditioned(ids).head_logits, plain(ids).head_logits)  # root_proj starts at 0
    randomise_heads(conditioned)
    out = conditioned(ids)
    hidden = out.hidden_states[0, 2]
    drafts = conditioned.draft_logits(hidden, ids[0, 3])
    assert drafts.shape == (2, TINY_VOCAB)
    torch.testing.assert_close(drafts, out.head_logits[:, 0, 2])  # position t sees token t + 1
    assert not torch.allclose(drafts, conditioned.draft_logits(hidden, (ids[0, 3] + 1) % TINY_VOCAB))
    with pytest.raises(ValueError, match="token_embeds"):
        conditioned.heads(hidden, conditioned.lm_head)
    conditioned.save_pretrained(tmp_path / "m")
    loaded = MedusaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "m")
    assert loaded.config.root_conditioned and torch.equal(loaded(ids).head_logits, out.head_logits)


def test_path_conditioned_head_k_sees_the_root_and_the_top1_drafts_before_its_own(tmp_path):
    """Head k reads tokens t + 1 .. t + k + 1: the root, then heads 0..k-1's own top-1 drafts (as generation
    drafts), or given tokens (teacher forcing); never a token after its own."""
    base = tiny_llama()
    plain = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=3))
    path = MedusaLoraModel.from_base(copy.deepcopy(base), MedusaConfig(num_heads=3, path_conditioned=True))
    assert path.heads.conditioning_tokens == 3 and len(path.heads.path_proj) == 2
    ids = torch.randint(0, TINY_VOCAB, (2, 7))
    torch.testing.assert_close(path(ids).head_logits, plain(ids).head_logits)  # every projection starts at 0
    randomise_heads(path)
    hidden = path(ids).hidden_states[0, 2]
    root = ids[0, 3]
    own = path.draft_logits(hidden, root)  # (3, V): head by head, each on the earlier heads' top-1
    drafts = own[:2].argmax(-1)
    torch.testing.assert_close(path.draft_logits(hidden, root, depth=2), own[:2])  # the first 2 heads alone
    torch.testing.assert_close(path.draft_logits(hidden, root, drafts), own)  # teacher-forced on the same
    other = (drafts + 1) % TINY_VOCAB
    forced = path.draft_logits(hidden, root, torch.stack([drafts[0], other[1]]))
    torch.testing.assert_close(forced[:2], own[:2])  # heads 0 and 1 do not read path token 2
    assert not torch.allclose(forced[2], own[2])  # head 2 does
    forced = path.draft_logits(hidden, root, torch.stack([other[0], drafts[1]]))
    torch.testing.assert_close(forced[0], own[0])
    assert not torch.allclose(forced[1], own[1]) and not torch.allclose(forced[2], own[2])
    assert not torch.allclose(path.draft_logits(hidden, (root + 1) % TINY_VOCAB)[0], own[0])
    path.save_pretrained(tmp_path / "m")
    loaded = MedusaLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "m")
    assert loaded.config.path_conditioned and torch.equal(loaded.draft_logits(hidden, root), own)


def test_path_conditioned_drafting_over_a_draft_vocabulary_reads_tables_that_follow_the_weights():
    """Without autograd, path tokens' shares come from tables made once for the whole draft vocabulary: they
    give the per-token projections' logits, and are remade when a weight changes in place (a training step)."""
    path = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4, path_conditioned=True))
    path.set_draft_vocab(torch.tensor([3, 5, 8, 13, 21, 34, 55, 89]))
    randomise_heads(path)
    hidden, root = torch.randn(2, path.config.hidden_size), torch.tensor([7, 40])
    with torch.no_grad():
        tabled = path.draft_logits(hidden, root)
        tables = path.heads._kept[PATH_TABLES][1]
    assert [tuple(t.shape) for t in tables] == [(4 - j, 8, path.config.hidden_size) for j in (1, 2, 3)]
    with torch.enable_grad():  # per-token projections, as in training
        computed = path.draft_logits(hidden, root)
    torch.testing.assert_close(tabled, computed.detach())
    with torch.no_grad():
        path.heads.path_proj[1].weight.mul_(-2)
        changed = path.draft_logits(hidden, root)
    assert path.heads._kept[PATH_TABLES][1][1] is not tables[1] and not torch.allclose(changed, tabled)
    with torch.enable_grad():
        torch.testing.assert_close(changed, path.draft_logits(hidden, root).detach())
    with torch.no_grad():  # the output layer's draft-vocabulary rows are kept too, and follow its weight
        path.lm_head.weight[path.heads.draft_vocab[0]] += 1.0
        relayered = path.draft_logits(hidden, root)
    assert not torch.allclose(relayered, changed)
    with torch.enable_grad():
        torch.testing.assert_close(relayered, path.draft_logits(hidden, root).detach())
    with torch.no_grad():  # the first heads alone: the same logits as theirs among all
        torch.testing.assert_close(path.draft_logits(hidden, root, depth=2), relayered[:2])

    large = MedusaLoraModel.from_base(
        tiny_llama(vocab_size=200), MedusaConfig(num_heads=4, path_conditioned=True)
    )
    large.set_draft_vocab(torch.arange(2 * large.config.hidden_size + 1))  # tables would outgrow weights
    randomise_heads(large)
    with torch.no_grad():
        drafts = large.draft_logits(hidden, root)
    assert PATH_TABLES not in large.heads._kept
    with torch.enable_grad():
        torch.testing.assert_close(drafts, large.draft_logits(hidden, root).detach())


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("with_lora", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, factory, with_lora):
    model = MedusaLoraModel.from_base(
        copy.deepcopy(factory()), MedusaConfig(num_heads=3), LORA if with_lora else None
    )
    randomise_heads(model)
    model.config.tree = [[0], [1], [0, 0]]
    model.save_pretrained(tmp_path / "m")
    loaded = MedusaLoraModel.from_pretrained(copy.deepcopy(factory()), tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.has_lora == with_lora
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    ids = torch.randint(0, TINY_VOCAB, (2, 8))
    a, b = model(ids), loaded(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.head_logits, b.head_logits)


def test_separate_lm_heads_round_trip(tmp_path):
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2, separate_lm_head=True))
    randomise_heads(model)
    model.save_pretrained(tmp_path / "m")
    loaded = MedusaLoraModel.from_pretrained(tiny_llama(), tmp_path / "m")
    ids = torch.randint(0, TINY_VOCAB, (1, 8))
    assert torch.equal(model(ids).head_logits, loaded(ids).head_logits)


@pytest.fixture
def saved(tmp_path):
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2), LORA)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_heads_for_another_hidden_size_are_refused(saved):
    with pytest.raises(IncompatibleBaseModelError, match="hidden size 64"):
        MedusaLoraModel.from_pretrained(tiny_llama(hidden_size=32), saved)


def test_heads_for_other_base_weights_are_refused(saved):
    with pytest.raises(IncompatibleBaseModelError, match="fingerprint"):
        MedusaLoraModel.from_pretrained(tiny_llama(seed=5), saved)


def test_missing_heads_file(saved):
    (saved / HEADS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)


def test_corrupt_heads_file(saved):
    (saved / HEADS_FILE).write_bytes(b"\x00" * 10 + b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)


def test_heads_file_with_other_tensors(saved):
    other = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=3))
    other.save_pretrained(saved.parent / "three")
    (saved / HEADS_FILE).write_bytes((saved.parent / "three" / HEADS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="unexpected"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)


def test_adapter_without_safetensors_is_refused(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)


def test_corrupt_adapter_file(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="LoRA adapter"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)


def test_unknown_config_keys(saved):
    config = json.loads((saved / "medusa_config.json").read_text())
    config["num_hedas"] = 3
    (saved / "medusa_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_hedas"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)


def test_corrupt_and_missing_config(saved, tmp_path):
    (saved / "medusa_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MedusaLoraModel.from_pretrained(tiny_llama(), saved)
    with pytest.raises(CheckpointError, match="not a medusa-lora model directory"):
        MedusaLoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_save_never_overwrites_by_accident(saved):
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=4))
    with pytest.raises(CheckpointError, match="overwrite=True"):
        model.save_pretrained(saved)
    assert MedusaConfig.load(saved).num_heads == 2  # untouched
    model.save_pretrained(saved, overwrite=True)
    assert MedusaConfig.load(saved).num_heads == 4
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]  # no staging dirs left behind


@pytest.mark.parametrize("bad", [{"num_heads": 0}, {"num_layers": -1}])
def test_bad_head_config_values(bad):
    with pytest.raises(ConfigError):
        MedusaConfig(**bad)


def test_heads_module_uses_one_lm_head_matmul(monkeypatch):
    config = MedusaConfig(num_heads=4, hidden_size=8, vocab_size=11)
    heads = MedusaHeads(config)
    lm_head = torch.nn.Linear(8, 11, bias=False)
    linear = torch.nn.functional.linear
    vocab_matmuls = []

    def counting_linear(x, weight, bias=None):
        if weight.shape[0] == 11:
            vocab_matmuls.append(tuple(x.shape))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    assert heads(torch.randn(3, 8), lm_head).shape == (4, 3, 11)
    assert vocab_matmuls == [(4, 3, 8)]


def test_draft_vocabulary_heads_score_only_their_tokens(tmp_path):
    from medusa_lora.drafting.heads import HeadDrafter
    from medusa_lora.model.heads import IGNORE_INDEX

    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2))
    randomise_heads(model)
    hidden = torch.randn(3, 64)
    full = model.heads(hidden, model.lm_head)
    vocab = torch.tensor([5, 17, 3, 90, 42])
    model.set_draft_vocab(vocab)
    assert model.config.draft_vocab_size == 5 and model.heads.vocab_size == 5
    draft = model.heads(hidden, model.lm_head)
    torch.testing.assert_close(draft, full[..., vocab])
    top, _ = HeadDrafter(model.heads).draft(draft[:, 0], [], TokenTree([(0,), (1,), (0, 0), (0, 1)]))
    assert set(top.flatten().tolist()) <= set(vocab.tolist())
    targets = model.heads.target_indices(torch.tensor([17, 4, IGNORE_INDEX, 42]))
    assert targets.tolist() == [1, IGNORE_INDEX, IGNORE_INDEX, 4]
    model.save_pretrained(tmp_path / "m")
    loaded = MedusaLoraModel.from_pretrained(tiny_llama(), tmp_path / "m")
    assert torch.equal(loaded.heads.draft_vocab, vocab)
    torch.testing.assert_close(loaded.heads(hidden, loaded.lm_head), draft)
    with pytest.raises(ValueError, match="distinct"):
        model.set_draft_vocab(torch.tensor([1, 1]))


class _OldStyleDecoder(torch.nn.Module):  # transformers up to 5.2x: the cache is `past_key_values`
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return input_ids


class _NewStyleDecoder(torch.nn.Module):  # after the rename: `cache`
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return input_ids


def test_cache_argument_follows_the_decoders_signature():
    assert cache_argument(_OldStyleDecoder()) == "past_key_values"
    assert cache_argument(_NewStyleDecoder()) == "cache"
    decoder = tiny_llama().model  # whichever transformers is installed, the name it finds is declared
    assert cache_argument(decoder) in inspect.signature(type(decoder).forward).parameters


def test_hidden_states_extends_the_cache_it_is_given():
    """On any transformers version: a silently ignored cache keyword would leave the cache empty."""
    model = MedusaLoraModel.from_base(tiny_llama(), MedusaConfig(num_heads=2))
    cache = DynamicCache(config=model.model_config)
    with torch.no_grad():
        model.hidden_states(torch.tensor([[1, 2, 3, 4]]), cache=cache, use_cache=True)
        assert cache.get_seq_length() == 4
        step = model.hidden_states(torch.tensor([[5]]), cache=cache, use_cache=True)
        full = model.hidden_states(torch.tensor([[1, 2, 3, 4, 5]]), use_cache=False)
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(step[0, -1], full[0, -1], atol=1e-5, rtol=1e-4)
