"""The official `openai` Python SDK, unchanged, against a real `speft serve` process (open mode,
tmp SQLite and storage, no worker): `completions.create`, `chat.completions.create` (also
streaming), with `model` naming the base model or the adapter itself (answers equal the
in-process reference), and the fine-tuning side: `files.create`, `fine_tuning.jobs.create`,
`retrieve`, `list`, `cancel`, `list_events`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from speft_core.delta import Delta, delta_to_bytes
from speft_core.models import load_model
from speft_core.serving import random_delta
from tests.api.conftest import start_client
from tests.api.test_adapters_api import make_adapter
from tests.api.test_jobs_api import CAUSAL_LM
from tests.fixtures.processes import REPO, service_env, spawn_cli, stop, wait_ready
from tests.fixtures.s3 import _free_port

MESSAGES = [{"role": "user", "content": "Tell me about a little dog."}]
PROMPT = "Once upon a time"
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           stories_dir: Path) -> Iterator[tuple[openai.OpenAI, TestClient, str, str]]:
    """(SDK client on a real server, an in-process client on the same database and storage,
    the adapter id, its job's id): the adapter is stored as a finished job leaves it, then
    `speft serve` runs."""
    tmp = tmp_path_factory.mktemp("openai-sdk")
    database, storage = f"sqlite:///{tmp / 'speft.db'}", f"file://{tmp / 'storage'}"
    delta: Delta = random_delta(load_model(stories_dir, "causal_lm"), density=0.05, seed=1,
                                base_model="stories-260k", scale=0.5)
    with ExitStack() as stack:
        local = start_client(stack, tmp)  # open mode: the default tenant, as the server's
        job_id, adapter_id = make_adapter(local, content=delta_to_bytes(delta),
                                          model="stories-260k", training=CAUSAL_LM)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = service_env(SPEFT_DATABASE_URL=database, SPEFT_STORAGE_URL=storage,
                          SPEFT_API_KEYS="", SPEFT_BROKER_URL="")
        log_path = tmp / "serve.log"
        log = stack.enter_context(log_path.open("wb"))
        process = spawn_cli(["serve", "--port", str(port)], env, REPO, log)
        stack.callback(stop, process)
        wait_ready(url, [process], lambda: log_path.read_text(errors="replace"))
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0,
                            timeout=60)
        yield sdk, local, adapter_id, job_id


def reference(local: TestClient, path: str, body: dict) -> dict:
    """What the in-process app answers (itself checked against the merged model elsewhere)."""
    response = local.post(path, json={"temperature": 0, "max_tokens": MAX_TOKENS, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_completions_create_with_the_adapter_as_model(served):
    sdk, local, adapter_id, _ = served
    want = reference(local, "/v1/chat/completions", {"model": "stories-260k",
                                                     "adapter": adapter_id,
                                                     "messages": MESSAGES})
    reply = sdk.chat.completions.create(model=adapter_id, messages=MESSAGES,
                                        max_tokens=MAX_TOKENS, temperature=0)
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert reply.usage.total_tokens == want["usage"]["total_tokens"]


def test_chat_completions_stream_through_the_sdk(served):
    sdk, local, adapter_id, _ = served
    want = reference(local, "/v1/chat/completions", {"model": "stories-260k",
                                                     "adapter": adapter_id,
                                                     "messages": MESSAGES})
    stream = sdk.chat.completions.create(model="stories-260k", messages=MESSAGES,
                                         max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                         extra_body={"adapter": adapter_id})
    chunks = list(stream)
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == want["choices"][0]["message"]["content"] and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == want["choices"][0]["finish_reason"]


def test_completions_create_on_the_base_and_the_adapter(served):
    sdk, local, adapter_id, _ = served
    for model, adapter in (("stories-260k", None), (adapter_id, None)):
        want = reference(local, "/v1/completions", {"model": model, "adapter": adapter,
                                                    "prompt": PROMPT})
        reply = sdk.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                       temperature=0)
        assert isinstance(reply, openai.types.Completion)
        assert reply.choices[0].text == want["choices"][0]["text"]
        assert reply.usage.completion_tokens == want["usage"]["completion_tokens"]


def test_sdk_errors_carry_the_status_and_the_field(served):
    sdk, *_ = served
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        sdk.chat.completions.create(model="stories-260k",
                                    messages=[{"role": "robot", "content": "hi"}])
    assert bad.value.body["param"] == "messages.0.role"


def test_fine_tuning_through_the_sdk(served):
    sdk, _, adapter_id, done_id = served
    uploaded = sdk.files.create(file=("chat.jsonl", CAUSAL_LM), purpose="fine-tune")
    assert isinstance(uploaded, openai.types.FileObject) and uploaded.purpose == "fine-tune"
    job = sdk.fine_tuning.jobs.create(model="stories-260k", training_file=uploaded.id)
    assert isinstance(job, openai.types.fine_tuning.FineTuningJob)
    assert (job.object, job.status, job.fine_tuned_model, job.result_files) == (
        "fine_tuning.job", "queued", None, [])
    assert isinstance(job.seed, int) and job.organization_id and job.training_file == uploaded.id

    done = sdk.fine_tuning.jobs.retrieve(done_id)
    assert (done.status, done.fine_tuned_model) == ("succeeded", adapter_id)
    listed = [j.id for j in sdk.fine_tuning.jobs.list(limit=1)]  # pages through `after`
    assert listed == [job.id, done_id]
    events = list(sdk.fine_tuning.jobs.list_events(job.id))  # one page: has_more is false
    assert events and all(e.object == "fine_tuning.job.event" and e.id.startswith("ftevent-")
                          for e in events)
    assert len({e.id for e in events}) == len(events)

    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
