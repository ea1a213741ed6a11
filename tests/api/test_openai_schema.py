"""The harness that holds our answers to OpenAI's published OpenAPI document
(tests/helpers/openai_schema.py): OpenAI's own examples pass, broken objects fail naming the
field, and the document's OpenAPI 3.0 idioms validate as OpenAI means them."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import pytest

from tests.helpers.openai_schema import (
    SPEC_PATH,
    assert_matches,
    openapi_document,
    response_schema_name,
    schema_errors,
)


def example(name: str) -> dict[str, Any]:
    """The first JSON object of OpenAI's own example of component `name` (x-oaiMeta)."""
    text = openapi_document()["components"]["schemas"][name]["x-oaiMeta"]["example"]
    return json.JSONDecoder().raw_decode(text.strip())[0]


def refused(instance: Any, name: str) -> str:
    """The harness's failure message for an instance it must refuse."""
    with pytest.raises(AssertionError) as failure:
        assert_matches(instance, name)
    return str(failure.value)


def test_the_vendored_document_is_the_recorded_file_under_the_mit_license():
    readme = (SPEC_PATH.parent / "README.md").read_text()
    recorded = re.search(r"sha256\s+`([0-9a-f]{64})`", readme)
    assert recorded and hashlib.sha256(SPEC_PATH.read_bytes()).hexdigest() == recorded[1]
    assert re.search(r"Commit: `[0-9a-f]{40}`", readme)
    assert (SPEC_PATH.parent / "LICENSE").read_text().startswith("The MIT License")
    assert openapi_document()["openapi"].startswith("3.1")


def test_openai_s_own_model_example_matches_and_a_broken_one_names_each_field():
    model = example("Model")
    assert_matches(model, "Model")
    broken = {key: value for key, value in model.items() if key != "owned_by"}
    message = refused({**broken, "created": "yesterday"}, "Model")
    assert "'owned_by' is a required property" in message
    assert "at $.created: 'yesterday' is not of type 'integer'" in message


def test_enums_are_enforced_and_fields_of_ours_are_allowed():
    file = {"id": "file-1", "object": "file", "bytes": 3, "created_at": 1, "filename": "a.jsonl",
            "purpose": "fine-tune", "status": "processed", "sha256": "ab", "num_examples": 2}
    assert_matches(file, "OpenAIFile")
    assert "'finetune' is not one of" in refused({**file, "purpose": "finetune"}, "OpenAIFile")
    assert "'done' is not one of" in refused({**file, "status": "done"}, "OpenAIFile")
    assert "'status' is a required property" in refused(
        {key: value for key, value in file.items() if key != "status"}, "OpenAIFile")


def test_additional_properties_false_is_enforced():
    strategy = {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}
    assert_matches(strategy, "StaticChunkingStrategy")
    assert "Additional properties are not allowed" in refused({**strategy, "extra": 1},
                                                               "StaticChunkingStrategy")


def test_nullable_admits_null_where_openai_says_so_and_nowhere_else():
    chunk = example("CreateChatCompletionStreamResponse")  # usage: {$ref, nullable: true}
    assert_matches({**chunk, "usage": None}, "CreateChatCompletionStreamResponse")
    assert "at $.model: None is not of type 'string'" in refused(
        {**chunk, "model": None}, "CreateChatCompletionStreamResponse")


def test_a_nullable_only_all_of_member_makes_the_property_nullable():
    run = openapi_document()["components"]["schemas"]["RunObject"]["properties"]
    # allOf: [{$ref: TruncationObject}, {nullable: true}] in the published document
    assert {"type": "null"} in run["truncation_strategy"]["anyOf"]


def test_a_boolean_exclusive_minimum_is_a_bound_at_the_minimum():
    job = {**example("FineTuningJob"), "error": None}  # OpenAI's example omits a required field
    assert_matches(job, "FineTuningJob")
    broken = copy.deepcopy(job)
    broken["hyperparameters"]["learning_rate_multiplier"] = 0
    assert "learning_rate_multiplier" in refused(broken, "FineTuningJob")


def test_a_recursive_reference_checks_nested_members():
    leaf = {"type": "eq", "key": "a", "value": "b"}
    assert_matches({"type": "and", "filters": [leaf, {"type": "or", "filters": [leaf]}]},
                   "CompoundFilter")
    nested_bad = {"type": "and", "filters": [{"type": "or", "filters": [{"type": "eq"}]}]}
    assert schema_errors(nested_bad, "CompoundFilter")


def test_operations_name_the_component_they_answer_with():
    assert response_schema_name("GET", "/files") == "ListFilesResponse"
    assert response_schema_name("delete", "/files/{file_id}") == "DeleteFileResponse"
    assert response_schema_name("get", "/models/{model}") == "Model"
    with pytest.raises(KeyError, match="NoSuchThing"):
        assert_matches({}, "NoSuchThing")
