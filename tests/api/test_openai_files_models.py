"""Files and models through the official `openai` SDK in strict mode
(`_strict_response_validation=True`: every answer must parse as the SDK's own types) against a
real `speft serve` process, each raw answer also held to OpenAI's published OpenAPI document
(tests/openai_spec): files.create / list (pages, `after`, `limit`, `order`, `purpose`, the SDK's
auto-pagination) / retrieve / content / delete, models.list / retrieve, and the error shape."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from tests.fixtures.processes import speft_serve
from tests.helpers.openai_schema import assert_matches, response_schema_name

FILES = 25
PAGE = 10
DATASET = b'{"text": "a fine day", "label": 1}\n{"text": "a grey day", "label": 0}\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, float]]:
    """(a strict SDK client on a fresh `speft serve` in open mode, when the server started)."""
    folder = tmp_path_factory.mktemp("openai-files-models")
    started = time.time()
    with speft_serve(folder, SPEFT_DATABASE_URL=f"sqlite:///{folder / 'speft.db'}",
                     SPEFT_STORAGE_URL=f"file://{folder / 'storage'}", SPEFT_API_KEYS="",
                     SPEFT_BROKER_URL="") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0,
                            timeout=60, _strict_response_validation=True), started


@pytest.fixture(scope="module")
def uploaded(served: tuple[openai.OpenAI, float]) -> list[str]:
    """The ids of FILES datasets uploaded through the SDK, each answer checked as OpenAI's."""
    sdk, _ = served
    ids = []
    for number in range(FILES):
        file, body = parsed(sdk.files.with_raw_response.create,
                            file=(f"train-{number}.jsonl", DATASET), purpose="fine-tune")
        assert_matches(body, response_schema_name("post", "/files"))
        assert isinstance(file, openai.types.FileObject) and file.status == "processed"
        assert (body["num_examples"], body["task"]) == (2, "classification")  # ours, kept
        ids.append(file.id)
    return ids


def parsed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """(the SDK's strictly validated answer, the JSON body as the server sent it) of a
    `with_raw_response` call."""
    response = call(*args, **kwargs)
    return response.parse(), response.http_response.json()


def listed(sdk: openai.OpenAI, **params: Any) -> list[str]:
    """The ids `sdk.files.list(**params)` yields as the SDK iterates it (every page); an
    iteration that would not end (a server ignoring `after`) is cut at 3 * FILES files."""
    return [file.id for file in itertools.islice(sdk.files.list(**params), 3 * FILES)]


def error_of(failure: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    """The error object of a refused SDK call, checked as OpenAI's ErrorResponse."""
    body = failure.value.response.json()
    assert_matches(body, "ErrorResponse")
    return body["error"]


def test_the_sdk_iterates_every_file_across_pages_and_stops(served, uploaded):
    sdk, _ = served
    paged = listed(sdk, limit=PAGE)
    assert len(paged) == FILES and set(paged) == set(uploaded)
    assert paged == listed(sdk)  # one page: limit defaults to 10,000
    pages = list(itertools.islice(sdk.files.list(limit=PAGE).iter_pages(), 5))
    assert [len(page.data) for page in pages] == [PAGE, PAGE, FILES - 2 * PAGE]
    assert [page.has_more for page in pages] == [True, True, False]


def test_a_page_is_openai_s_list_and_after_continues_it(served, uploaded):
    sdk, _ = served
    page, body = parsed(sdk.files.with_raw_response.list, limit=PAGE)
    assert_matches(body, response_schema_name("get", "/files"))
    ids = [file["id"] for file in body["data"]]
    assert (body["object"], body["has_more"], len(ids)) == ("list", True, PAGE)
    assert (body["first_id"], body["last_id"]) == (ids[0], ids[-1])
    created = [file["created_at"] for file in body["data"]]
    assert created == sorted(created, reverse=True)  # newest first by default
    _, rest = parsed(sdk.files.with_raw_response.list, limit=FILES, after=body["last_id"])
    assert_matches(rest, "ListFilesResponse")
    assert rest["has_more"] is False and len(rest["data"]) == FILES - PAGE
    assert set(ids).isdisjoint(file["id"] for file in rest["data"])


def test_order_asc_is_the_reverse_and_pages_the_same_way(served, uploaded):
    sdk, _ = served
    assert listed(sdk, limit=7, order="asc") == listed(sdk)[::-1]


def test_purpose_filters_and_an_empty_page_says_so(served, uploaded):
    sdk, _ = served
    assert len(listed(sdk, purpose="fine-tune")) == FILES
    _, empty = parsed(sdk.files.with_raw_response.list, purpose="assistants")
    # OpenAI's document types this list's first_id/last_id as strings; an empty page has no
    # ends, so they are null (as the document types them in its checkpoint list); the rest of
    # the page is OpenAI's shape
    assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None,
                     "last_id": None}
    assert_matches({**empty, "first_id": "", "last_id": ""}, "ListFilesResponse")


def test_bad_list_parameters_are_refused_naming_the_parameter(served, uploaded):
    sdk, _ = served
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.files.list(after="file-000000000000000000000000")
    error = error_of(unknown)
    assert (error["type"], error["param"]) == ("invalid_request_error", "after")
    for limit in (0, 10_001):
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.files.list(limit=limit)
        assert 400 <= refused.value.status_code < 500
        assert error_of(refused)["param"] == "limit"
    with pytest.raises(openai.APIStatusError) as bad_order:
        sdk.files.with_raw_response.list(extra_query={"order": "sideways"})
    assert error_of(bad_order)["param"] == "order"


def test_retrieve_content_and_delete_as_openai_answers(served, uploaded):
    sdk, _ = served
    file, body = parsed(sdk.files.with_raw_response.retrieve, uploaded[0])
    assert_matches(body, response_schema_name("get", "/files/{file_id}"))
    assert file.id == uploaded[0] and body["sha256"] and body["purpose"] == "fine-tune"
    assert sdk.files.content(uploaded[0]).content == DATASET

    extra = sdk.files.create(file=("gone.jsonl", DATASET), purpose="fine-tune")
    newest = sdk.files.list(limit=1).data[0].id
    deleted, answer = parsed(sdk.files.with_raw_response.delete, extra.id)
    assert_matches(answer, response_schema_name("delete", "/files/{file_id}"))
    assert (deleted.id, deleted.deleted) == (extra.id, True)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.files.retrieve(extra.id)
    assert error_of(missing)["param"] == "file_id"
    # a page's last file, deleted before the next page is asked for, still continues the list
    assert newest == extra.id
    assert sorted(listed(sdk, after=extra.id)) == sorted(uploaded)


def test_models_carry_created_and_owned_by(served):
    sdk, started = served
    models, body = parsed(sdk.models.with_raw_response.list)
    assert_matches(body, response_schema_name("get", "/models"))
    by_id = {model["id"]: model for model in body["data"]}
    minilm = by_id["minilm-l6"]
    assert minilm["owned_by"] == "speft" and minilm["object"] == "model"
    assert int(started) - 1 <= minilm["created"] <= time.time()  # registered at startup
    assert (minilm["task"], minilm["params"] > 0) == ("classification", True)  # ours, kept
    assert {model.id for model in models.data} == set(by_id)

    model, one = parsed(sdk.models.with_raw_response.retrieve, "minilm-l6")
    assert_matches(one, response_schema_name("get", "/models/{model}"))
    assert (model.created, model.owned_by) == (minilm["created"], "speft") and one == minilm
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("gpt-9")
    assert error_of(missing)["param"] == "model"

