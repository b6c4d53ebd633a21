"""``medusa-lora serve`` on tiny random models: uvicorn on 127.0.0.1, driven by the real ``openai`` client."""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from peft import LoraConfig

from medusa_lora.cli.serve import main
from medusa_lora.decoding import eos_token_ids, generate
from medusa_lora.errors import CheckpointError, ConfigError, IncompatibleBaseModelError
from medusa_lora.model.config import MedusaConfig
from medusa_lora.model.wrapper import ADAPTER_WEIGHTS, MedusaLoraModel
from medusa_lora.prompting import PromptFormat
from medusa_lora.serving.app import create_app
from medusa_lora.serving.registry import Registry

from conftest import CHAR_VOCAB, char_tokenizer, tiny_llama

pytestmark = pytest.mark.usefixtures("both_forwards")  # every test on the eager and the static forward

BASE = "base"
ADAPTERS = ("alpha", "beta", "generic")  # two LoRA + heads adapters, and heads only
MESSAGES = [{"role": "user", "content": "How many errors?"}]
CONTEXT = 512  # tiny_llama's max_position_embeddings
VOCAB = CHAR_VOCAB


def _adapter(base, seed: int, heads: int, lora: bool, tree=None) -> MedusaLoraModel:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = MedusaLoraModel.from_base(
        copy.deepcopy(base), MedusaConfig(num_heads=heads), config if lora else None
    )
    for param in model.heads.parameters():
        torch.nn.init.normal_(param, std=0.2)
    model.config.tree = tree
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base dir with a chat tokenizer, and three adapter dirs trained (randomly) on it."""
    root = tmp_path_factory.mktemp("serve")
    base = tiny_llama(vocab_size=len(VOCAB))
    base.save_pretrained(root / BASE)
    char_tokenizer().save_pretrained(root / BASE)
    _adapter(base, 1, 3, True, [[0], [1], [0, 0]]).save_pretrained(root / "alpha")
    _adapter(base, 2, 2, True).save_pretrained(root / "beta")
    _adapter(base, 3, 2, False).save_pretrained(root / "generic")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(saved):
    registry = Registry.load(
        str(saved / BASE), {name: saved / name for name in ADAPTERS}, served_base_name=BASE
    )
    port = _free_port()
    uv = uvicorn.Server(
        uvicorn.Config(create_app(registry, queue_size=1), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(
        url=url, registry=registry, client=openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    )
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def references(saved):
    """Each served name loaded on its own, the way generate() users load it: the outputs to match."""
    base_dir = str(saved / BASE)
    models = {name: MedusaLoraModel.from_pretrained(base_dir, saved / name) for name in ADAPTERS}
    models[BASE] = MedusaLoraModel.from_base(base_dir)
    return models


def _reference(model: MedusaLoraModel, chat: bool, prompt, **kwargs):
    """What ``generate()`` gives for the prompt the server builds (the base alone decodes plainly)."""
    prompt_format = PromptFormat(model.tokenizer, use_chat_template=chat)
    ids = prompt_format.encode(prompt)
    return generate(model, ids, eos_token_id=prompt_format.stop_ids(eos_token_ids(model)), **kwargs)


def _metric(server, pattern: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_models_lists_the_base_and_every_adapter(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == [BASE, *ADAPTERS]
    assert server.client.models.retrieve("alpha").id == "alpha"


def test_greedy_chat_equals_generate_token_for_token_with_adapters_alternating(server, references):
    outputs = {}
    for name in ["alpha", "beta", "alpha", "generic", "beta", BASE]:
        response = server.client.chat.completions.create(
            model=name, messages=MESSAGES, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
        )
        expected = _reference(references[name], True, MESSAGES, max_new_tokens=24, speculative=name != BASE)
        extension = response.model_extra["medusa"]
        assert extension["token_ids"] == expected.tokens, name
        assert response.choices[0].message.content == expected.text
        assert response.usage.completion_tokens == len(expected.tokens)
        assert response.usage.prompt_tokens == expected.stats.prompt_tokens
        assert response.usage.total_tokens == response.usage.prompt_tokens + len(expected.tokens)
        assert response.choices[0].finish_reason in ("stop", "length")
        assert extension["steps"] == expected.stats.steps and extension["tokens_per_s"] > 0
        outputs[name] = expected.tokens
    assert outputs["alpha"] != outputs["beta"] != outputs[BASE]  # each request ran on its own LoRA
    assert server.client.models.retrieve("alpha").model_extra["medusa"]["tree_size"] == 4


def test_streaming_sends_the_same_text_and_ends_with_done(server):
    kwargs = {"model": "beta", "messages": MESSAGES, "max_tokens": 30, "temperature": 0}
    whole = server.client.chat.completions.create(**kwargs)
    chunks = list(
        server.client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(f"{server.url}/v1/chat/completions", json={**kwargs, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_completions_take_raw_text_and_equal_generate(server, references):
    expected = _reference(references["beta"], False, "abc", max_new_tokens=10)
    response = server.client.completions.create(model="beta", prompt="abc", max_tokens=10, temperature=0)
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == len(expected.tokens)
    streamed = server.client.completions.create(
        model="beta", prompt="abc", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_stop_strings_stop_generation_and_are_cut(server, references):
    full = _reference(references["alpha"], True, MESSAGES, max_new_tokens=40).text
    stop = full[6:8]
    cut = full[: full.index(stop)]
    expected = _reference(references["alpha"], True, MESSAGES, max_new_tokens=40, stop_strings=[stop])
    kwargs = {"model": "alpha", "messages": MESSAGES, "max_tokens": 40, "temperature": 0, "stop": [stop]}
    response = server.client.chat.completions.create(**kwargs, extra_body={"return_token_ids": True})
    assert response.choices[0].message.content == cut and response.choices[0].finish_reason == "stop"
    assert response.model_extra["medusa"]["token_ids"] == expected.tokens
    streamed = server.client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut


def test_sampling_with_a_seed_is_the_librarys_sampling(server, references):
    kwargs = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    expected = _reference(references["alpha"], True, MESSAGES, max_new_tokens=20, **kwargs)
    for _ in range(2):
        response = server.client.chat.completions.create(
            model="alpha", messages=MESSAGES, max_tokens=20, extra_body={"return_token_ids": True}, **kwargs
        )
        assert response.model_extra["medusa"]["token_ids"] == expected.tokens


def test_speculation_can_be_switched_off_per_request(server):
    kwargs = {"model": "alpha", "messages": MESSAGES, "max_tokens": 20, "temperature": 0}
    on = server.client.chat.completions.create(**kwargs)
    off = server.client.chat.completions.create(**kwargs, extra_body={"speculative": False})
    assert on.choices[0].message.content == off.choices[0].message.content
    assert off.model_extra["medusa"]["tree_size"] == 1 and on.model_extra["medusa"]["tree_size"] == 4


@pytest.mark.parametrize(
    "change, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x" * (CONTEXT + 10)}]}, "messages"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(server, change, param):
    with pytest.raises(openai.BadRequestError) as info:
        server.client.chat.completions.create(**{"model": "alpha", "messages": MESSAGES, **change})
    assert info.value.status_code == 400
    error = info.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_unknown_model_is_404_in_openais_shape(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.client.chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found" and "alpha" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("nope")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b"{}",
        json.dumps({"model": "alpha"}).encode(),
        json.dumps({"model": "alpha", "messages": "hi"}).encode(),
        json.dumps({"model": "alpha", "messages": []}).encode(),
        json.dumps({"model": "alpha", "messages": [{"role": "user", "content": 5}]}).encode(),
        json.dumps({"model": 3, "messages": MESSAGES}).encode(),
        json.dumps({"model": "alpha", "messages": MESSAGES, "max_tokens": "many"}).encode(),
    ],
)
def test_malformed_bodies_are_400_and_the_server_keeps_serving(server, body):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert (
        server.client.completions.create(model="beta", prompt="ok", max_tokens=2).usage.completion_tokens >= 1
    )


def test_bad_token_ids_and_unknown_routes(server):
    bad = httpx.post(f"{server.url}/v1/completions", json={"model": "beta", "prompt": [1, 10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"]


class _Gate:
    """A forward pre-hook on the served base: holds the worker thread until opened, and counts forwards."""

    def __init__(self, delay: float = 0.0) -> None:
        self.opened, self.entered, self.delay, self.calls = threading.Event(), threading.Event(), delay, 0

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.entered.set()
        self.opened.wait(30)
        time.sleep(self.delay)


def _hooked(server, gate: _Gate):
    decoder = server.registry.get(BASE).model.decoder
    return decoder.register_forward_pre_hook(gate, with_kwargs=True)


def test_a_full_queue_answers_429(server):
    gate = _Gate()
    handle = _hooked(server, gate)
    results = []

    def request() -> None:
        results.append(server.client.completions.create(model="beta", prompt="abc", max_tokens=3))

    try:
        running = threading.Thread(target=request)
        running.start()
        assert gate.entered.wait(10)  # the first request holds the worker
        queued = threading.Thread(target=request)
        queued.start()
        deadline = time.monotonic() + 10
        while _metric(server, "medusa_lora_queue_depth") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as info:
            server.client.completions.create(model="beta", prompt="abc", max_tokens=3)
        assert info.value.body["code"] == "queue_full"
    finally:
        gate.opened.set()
        handle.remove()
    running.join(10)
    queued.join(10)
    assert len(results) == 2


def test_a_disconnected_stream_stops_its_generation(server, references):
    max_tokens = 300
    plain = _reference(references[BASE], False, "xyz", max_new_tokens=max_tokens, speculative=False)
    assert len(plain.tokens) == max_tokens
    gate = _Gate(delay=0.02)
    gate.opened.set()
    cancelled = 'medusa_lora_requests_total{model="base",outcome="cancelled"}'
    before = _metric(server, cancelled)
    handle = _hooked(server, gate)
    try:
        body = {"model": BASE, "prompt": "xyz", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break  # the first delta: go away
        deadline = time.monotonic() + 20
        while _metric(server, cancelled) == before:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
        assert gate.calls < max_tokens // 3  # it stopped long before the end
    finally:
        handle.remove()
    assert (
        server.client.completions.create(model="beta", prompt="next", max_tokens=3).choices[0].text
        is not None
    )


def test_metrics_report_requests_tokens_and_speed_per_adapter(server):
    server.client.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="nope", messages=MESSAGES)
    assert _metric(server, r'medusa_lora_requests_total\{model="alpha",outcome="ok"\}') >= 1
    assert _metric(server, r'medusa_lora_completion_tokens_total\{model="alpha"\}') >= 8
    assert _metric(server, r'medusa_lora_tokens_per_second\{model="alpha"\}') > 0
    assert _metric(server, r'medusa_lora_tokens_per_step\{model="alpha"\}') >= 1
    assert _metric(server, r'medusa_lora_errors_total\{code="404",model=""\}') >= 1


def test_a_failed_adapter_leaves_the_registry_unchanged(server, saved, references, tmp_path):
    registry = server.registry
    names = registry.names
    corrupt = tmp_path / "corrupt"
    _adapter(tiny_llama(vocab_size=len(VOCAB)), 4, 2, True).save_pretrained(corrupt)
    (corrupt / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        registry.add("corrupt", corrupt)
    other = tmp_path / "other-base"
    _adapter(tiny_llama(vocab_size=len(VOCAB), hidden_size=32), 5, 2, True).save_pretrained(other)
    with pytest.raises(IncompatibleBaseModelError, match="hidden size"):
        registry.add("other", other)
    with pytest.raises(ConfigError, match="already served"):
        registry.add("alpha", saved / "alpha")
    assert registry.names == names
    response = server.client.chat.completions.create(
        model="alpha", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    expected = _reference(references["alpha"], True, MESSAGES, max_new_tokens=12)
    assert response.model_extra["medusa"]["token_ids"] == expected.tokens


def test_cli_checks_adapter_arguments_before_serving(saved):
    with pytest.raises(SystemExit):
        main(["--model", str(saved / BASE), "--adapter", "no-equals-sign"])
    with pytest.raises(ConfigError, match="unique"):
        main(
            [
                "--model",
                str(saved / BASE),
                "--adapter",
                f"a={saved / 'alpha'}",
                "--adapter",
                f"a={saved / 'beta'}",
            ]
        )
    with pytest.raises(CheckpointError, match="missing"):
        main(["--model", str(saved / BASE), "--adapter", f"a={saved / 'missing'}"])
