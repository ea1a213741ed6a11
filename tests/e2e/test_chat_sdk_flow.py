"""End to end through the official `openai` SDK: a real `speft serve` and `speft worker` on the
embedded stack (SQLite, embedded broker, file:// storage, open mode). A chat file is uploaded
with `files.create`, a job on `stories-260k` trains on it (`fine_tuning.jobs.create`, polled with
`retrieve`), and `chat.completions.create` with `model` = the job's `fine_tuned_model` answers
what the same request naming the adapter in `adapter` answers over plain HTTP. A bad chat file
is refused at upload with `BadRequestError`, its body naming the line and the reason."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.test_service_flow import TERMINAL, Stack, _embedded_env, running_stack

pytestmark = pytest.mark.slow

CHAT_SET = Path(__file__).parents[1] / "data" / "alpaca_chat40" / "train.jsonl"
JOB_TIMEOUT_S = 120.0
MESSAGES = [{"role": "user", "content": "What are the three primary colors?"}]


@pytest.fixture
def embedded(tmp_path: Path, stories_dir: Path) -> Iterator[Stack]:
    """A real API process and a real worker process on the embedded stack, stopped afterwards
    (`stories_dir` skips where the stories-260k model is absent)."""
    env = _embedded_env(tmp_path, f"e2e-chat-{uuid.uuid4().hex[:8]}")
    env["SPEFT_MODELS_DIR"] = str(stories_dir.parent)  # registers stories-260k
    with running_stack(env, None, tmp_path) as stack:
        yield stack


def _wait(sdk: openai.OpenAI, stack: Stack, job_id: str) -> openai.types.fine_tuning.FineTuningJob:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            return job
        if stack.processes["worker"].poll() is not None:
            pytest.fail(f"the worker exited while {job_id} was {job.status}:\n{stack.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{job_id} still {job.status} after {JOB_TIMEOUT_S:.0f}s:\n"
                        f"{stack.output()}")
        time.sleep(0.5)


def test_chat_file_to_chat_answer_through_the_sdk(embedded: Stack) -> None:
    sdk = openai.OpenAI(base_url=f"{embedded.url}/v1", api_key="anything", max_retries=0,
                        timeout=60)
    uploaded = sdk.files.create(file=("chat.jsonl", CHAT_SET.read_bytes()), purpose="fine-tune")
    assert isinstance(uploaded, openai.types.FileObject)
    assert uploaded.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model="stories-260k", training_file=uploaded.id,
        hyperparameters={"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-2,
                         "max_length": 128},  # type: ignore[typeddict-unknown-key]
        extra_body={"method": {"type": "speft",
                               "speft": {"density": 0.05, "scoring_examples": 16}}})
    assert (job.status, job.fine_tuned_model) == ("queued", None)
    job = _wait(sdk, embedded, job.id)
    assert job.status == "succeeded", f"{job}\n{embedded.output()}"
    assert job.fine_tuned_model
    events = list(sdk.fine_tuning.jobs.list_events(job.id))
    assert events, job

    reply = sdk.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES,
                                        max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    plain = httpx.post(f"{embedded.url}/v1/chat/completions", timeout=60, json={
        "model": "stories-260k", "adapter": job.fine_tuned_model, "messages": MESSAGES,
        "max_tokens": 8, "temperature": 0})
    assert plain.status_code == 200, plain.text
    want = plain.json()["choices"][0]
    assert reply.choices[0].message.content == want["message"]["content"]
    assert reply.choices[0].finish_reason == want["finish_reason"]
    base = sdk.chat.completions.create(model="stories-260k", messages=MESSAGES, max_tokens=8,
                                       temperature=0)
    assert base.choices[0].message.content is not None  # the base answers too

    robot = (b'{"messages": [{"role": "robot", "content": "Hi"}, '
             b'{"role": "assistant", "content": "Hello"}]}\n')
    bad = [*CHAT_SET.read_bytes().splitlines(keepends=True)[:2], robot]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("bad.jsonl", b"".join(bad)), purpose="fine-tune")
    error = refused.value.body
    assert isinstance(error, dict) and error["message"].startswith("line 3: "), error
    assert "role" in error["message"] and "robot" in error["message"], error
    assert "Traceback" not in embedded.logs["worker"].read_text(errors="replace")
