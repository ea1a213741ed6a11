"""`POST /v1/chat/completions` over HTTP on the real stories-260k base with synthetic adapters.

Every answer is checked against the plain reference: the conversation rendered with
`speft_core.chat.render_chat` (the adapter's recorded template, else the tokenizer's, else the
default), generated greedily by the base with the adapter's delta merged.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from speft_core.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from speft_core.delta import Delta, merge_delta
from speft_core.models import load_model, load_tokenizer
from speft_core.serving import Completion, SamplingParams
from speft_core.serving.generation import generate
from tests.api import test_inference_api as inference
from tests.api.test_inference_api import (
    ALICE,
    BOB,
    MAX_TOKENS,
    assert_error,
    post_json,
    sse_events,
    store_lm,
    weighted_sum,
)

# the inference module's fixtures: its started app and synthetic stories-260k adapters A and B
client, lm_deltas, lm_ids = inference.client, inference.lm_deltas, inference.lm_ids

MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me about a little dog."}]
# a template of its own, recorded in an adapter's metadata as a chat job records it
CUSTOM_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ 'Once upon a time' }}{% endif %}")


@pytest.fixture(scope="module")
def templated_id(client: TestClient, lm_deltas: dict[str, Delta]) -> str:
    """Alice's adapter B, its metadata carrying CUSTOM_TEMPLATE as `chat_template`."""
    delta = lm_deltas["B"]
    return store_lm(client, Delta(modules=delta.modules, extras=delta.extras,
                                  metadata={**delta.metadata, "chat_template": CUSTOM_TEMPLATE}))


@pytest.fixture(scope="module")
def chat_reference(stories_dir: Path, lm_deltas: dict[str, Delta],
                   ) -> Callable[[Delta | None, list[dict[str, str]], str | None], Completion]:
    """(delta or None, messages, template) -> the merged model's greedy reply of MAX_TOKENS."""
    tokenizer = load_tokenizer(stories_dir)

    def reply(delta: Delta | None, messages: list[dict[str, str]],
              template: str | None) -> Completion:
        model = load_model(stories_dir, "causal_lm").eval()
        if delta is not None:
            merge_delta(model, delta)
        ids = render_chat(tokenizer, messages, template=template or DEFAULT_CHAT_TEMPLATE,
                          add_generation_prompt=True).input_ids
        with torch.inference_mode():
            return generate(model, tokenizer, [ids],
                            [SamplingParams(max_tokens=MAX_TOKENS, temperature=0)])[0]

    return reply


def chat(client: TestClient, adapter: Any, messages: Any = MESSAGES,
         headers: dict[str, str] = ALICE, **fields: Any) -> Any:
    """POST /v1/chat/completions, greedy over MAX_TOKENS unless `fields` say otherwise."""
    body = {"model": "stories-260k", "adapter": adapter, "messages": messages,
            "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return post_json(client, "/v1/chat/completions", headers, body)


def test_chat_reply_equals_the_merged_model_on_the_rendered_conversation(
        client, lm_ids, lm_deltas, chat_reference):
    want = chat_reference(lm_deltas["A"], MESSAGES, None)
    response = chat(client, lm_ids["A"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl")
    assert isinstance(body["created"], int) and body["model"] == "stories-260k"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": want.text},
                                "finish_reason": want.finish_reason}]
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens,
                             "completion_tokens": want.completion_tokens,
                             "total_tokens": want.prompt_tokens + want.completion_tokens}
    assert want.text != chat_reference(None, MESSAGES, None).text  # the adapter matters


def test_the_adapters_recorded_template_formats_the_prompt(client, templated_id, lm_deltas,
                                                           chat_reference):
    want = chat_reference(lm_deltas["B"], MESSAGES, CUSTOM_TEMPLATE)
    response = chat(client, templated_id)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == want.text
    assert response.json()["usage"]["prompt_tokens"] == want.prompt_tokens
    assert want.prompt_tokens != chat_reference(lm_deltas["B"], MESSAGES, None).prompt_tokens


# a template that ends an assistant turn with "a" (a plain-text end-of-turn marker, one the
# synthetic adapter's replies are sure to hold)
PERIOD_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                   "{% if m['role'] == 'assistant' %}{{ ' a' }}{% endif %}{{ '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_the_templates_end_of_turn_marker_stops_the_reply(client, lm_deltas, chat_reference):
    delta = lm_deltas["A"]
    adapter_id = store_lm(client, Delta(modules=delta.modules, extras=delta.extras,
                                        metadata={**delta.metadata,
                                                  "chat_template": PERIOD_TEMPLATE}))
    unstopped = chat_reference(delta, MESSAGES, PERIOD_TEMPLATE).text
    assert "a" in unstopped[1:], unstopped  # the model writes the marker within MAX_TOKENS
    response = chat(client, adapter_id)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == unstopped[: unstopped.index("a")]
    assert choice["finish_reason"] == "stop"


def test_a_composition_serves_the_weighted_sum(client, lm_ids, lm_deltas, chat_reference):
    parts = [{"id": lm_ids["A"], "weight": 0.5}, {"id": lm_ids["B"], "weight": 0.7}]
    want = chat_reference(weighted_sum([(lm_deltas["A"], 0.5), (lm_deltas["B"], 0.7)]),
                          MESSAGES, None)
    response = chat(client, parts)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == want.text


def test_model_may_name_the_adapter_itself(client, lm_ids, lm_deltas, chat_reference):
    want = chat_reference(lm_deltas["A"], MESSAGES, None)
    response = chat(client, None, model=lm_ids["A"])
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == want.text
    assert response.json()["model"] == lm_ids["A"]
    assert_error(chat(client, lm_ids["B"], model=lm_ids["A"]), 400, "adapter")
    assert_error(chat(client, None, model=lm_ids["A"], headers=BOB), 404, "model")


def test_streamed_chunks_concatenate_to_the_same_reply(client, lm_ids, lm_deltas,
                                                       chat_reference):
    want = chat_reference(lm_deltas["A"], MESSAGES, None)
    response = chat(client, lm_ids["A"], stream=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == want.text and len(chunks) > 3
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason
    assert chunks[-1]["usage"]["completion_tokens"] == want.completion_tokens


@pytest.mark.parametrize(("messages", "param"), [
    ([], "messages"),
    ([{"role": "robot", "content": "hi"}], "messages.0.role"),
    ([{"role": "user", "content": 3}], "messages.0.content"),
    ([{"role": "user"}], "messages.0.content"),
    ([{"role": "user", "content": "hi", "name": "x"}], "messages.0.name"),
    ("hello", "messages"),
    ([{"role": "user", "content": "hi"}] * 257, "messages"),
])
def test_bad_messages_are_422_naming_the_field(client, messages, param):
    assert_error(chat(client, None, messages=messages), 422, param)


def test_a_conversation_over_the_limits_is_400_naming_messages(client):
    long = [{"role": "user", "content": "dog " * 30_000}]  # over 100,000 characters
    assert_error(chat(client, None, messages=long), 400, "messages")
    over_positions = [{"role": "user", "content": "the dog ran. " * 300}]
    assert_error(chat(client, None, messages=over_positions), 400, "messages")
    assert_error(chat(client, None, messages=[{"role": "user", "content": "\ud800"}]), 400,
                 "messages[0].content")
