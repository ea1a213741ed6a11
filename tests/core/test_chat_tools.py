"""OpenAI's supervised chat format as is: tools, tool calls, tool results, legacy functions,
developer messages, text parts, names and weights; refusals naming the line and field; the
rendering and loss mask of tool calls; lengths that follow the data; real runs on stories-260k."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from speft_core import data as datasets
from speft_core.chat import (
    DEFAULT_CHAT_TEMPLATE,
    RenderedChat,
    choose_chat_template,
    render_chat,
    tokenize_chat,
    unrendered_fields,
)
from speft_core.chat_data import ToolCall
from speft_core.config import MAX_LENGTH, JobSpec
from speft_core.delta import CHAT_TEMPLATE_KEY
from speft_core.errors import ConfigError, DatasetFormatError
from speft_core.lengths import effective_max_length
from speft_core.models import load_tokenizer
from speft_core.train import StepReport, TrainCallbacks, fine_tune
from tests.helpers.openai_schema import assert_matches

TOOL_SET = Path(__file__).parents[1] / "data" / "tool_calls20" / "train.jsonl"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
USER = {"role": "user", "content": "Weather in Oslo?"}
CALL = {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "2C, snow"}
ANSWER = {"role": "assistant", "content": "It is 2C and snowing."}
# Hermes/Qwen-style: tools in a system block, calls as <tool_call> JSON, results as user turns.
HERMES = (
    "{% if tools %}{{ '<|im_start|>system\\n# Tools\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson + '\\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}{{ '\\n<tool_call>\\n' + "
    "{'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_TOOLS = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer(stories_dir: Path):
    return load_tokenizer(stories_dir)


def row(*messages: dict, **fields: object) -> str:
    return json.dumps({"messages": list(messages), **fields})


def tool_rows() -> list[datasets.ChatExample]:
    task, rows = datasets.parse_dataset(TOOL_SET.read_bytes().splitlines(keepends=True))
    assert task == "causal_lm"
    return rows


def supervised_runs(tokenizer, rendered: RenderedChat) -> list[str]:
    """The runs of text whose tokens the loss covers, in order."""
    offsets = tokenizer(rendered.text, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    covered = sorted({i for (start, end), on in zip(offsets, rendered.assistant_mask) if on
                      for i in range(start, end)})
    runs: list[str] = []
    for position, index in enumerate(covered):
        if position == 0 or covered[position - 1] != index - 1:
            runs.append("")
        runs[-1] += rendered.text[index]
    return runs


_MESSAGE_SCHEMAS = {"assistant": "FineTuneChatCompletionRequestAssistantMessage",
                    **{role: f"ChatCompletionRequest{role.title()}Message"
                       for role in ("system", "developer", "user", "tool", "function")}}


def test_the_function_calling_file_is_in_openais_own_schemas() -> None:
    for line in TOOL_SET.read_text().splitlines():
        raw = json.loads(line)
        for message in raw["messages"]:
            assert_matches(message, _MESSAGE_SCHEMAS[message["role"]])
        for tool in raw.get("tools", []):
            assert_matches(tool, "ChatCompletionTool")
        for function in raw.get("functions", []):
            assert_matches(function, "ChatCompletionFunctions")


def test_the_function_calling_file_parses_every_feature() -> None:
    rows = tool_rows()
    assert len(rows) == 20 and rows[0].tools == (WEATHER,)
    first = rows[0].messages
    assert [m.role for m in first] == ["system", "user", "assistant", "tool", "assistant"]
    assert first[2].content == "" and first[2].tool_calls == (
        ToolCall("get_weather", '{"city": "Paris"}', id="call_0"),)
    assert (first[3].tool_call_id, first[3].content) == ("call_0", "18C, sunny")
    parts = rows[8]  # developer message and user message as text parts; ends with the call
    assert [(m.role, m.content) for m in parts.messages[:2]] == [
        ("developer", "Use the tools. Be brief."), ("user", "Is it cold in Paris?")]
    assert parts.parallel_tool_calls is False and parts.messages[-1].tool_calls
    parallel = rows[12]  # names, a weight-0 greeting, two calls answered out of order
    assert parallel.parallel_tool_calls is True
    assert [(m.name, m.weight) for m in parallel.messages[:3]] == [
        ("sam", 1), (None, 0), ("sam", 1)]
    assert [c.id for c in parallel.messages[3].tool_calls] == ["call_20", "call_30"]
    assert [m.tool_call_id for m in parallel.messages[4:6]] == ["call_30", "call_20"]
    legacy = rows[18]  # functions / function_call / function message, read as tools
    assert legacy.tools[0]["function"]["name"] == "get_weather"
    assert legacy.messages[1].tool_calls == (ToolCall("get_weather", '{"city": "Rome"}'),)
    assert (legacy.messages[2].role, legacy.messages[2].name) == ("tool", "get_weather")


GOOD = row(USER, CALL, RESULT, ANSWER, tools=[WEATHER])
CALLS = CALL["tool_calls"]


def with_call(**function: object) -> dict:
    return {"role": "assistant", "tool_calls": [
        {**CALLS[0], "function": {**CALLS[0]["function"], **function}}]}


@pytest.mark.parametrize("bad, param, fragment", [
    (row(USER, ANSWER, metadata={}), "metadata", "unknown field metadata: a chat row takes"),
    (row({**USER, "lang": "en"}, ANSWER), "messages[0].lang", "unknown field messages[0].lang"),
    (row(USER, {**ANSWER, "refusal": "no"}), "messages[1].refusal", "unknown field"),
    (row(USER, CALL, {**RESULT, "name": "x"}, ANSWER), "messages[2].name", "a tool message takes"),
    (row(USER, CALL, {**RESULT, "tool_call_id": "call_9"}, ANSWER), "messages[2].tool_call_id",
     "'call_9' answers no pending call (the pending calls of messages[1] are 'call_1')"),
    (row(USER, CALL, RESULT, RESULT, ANSWER), "messages[3].tool_call_id",
     "no tool call before it awaits an answer"),
    (row(RESULT, ANSWER), "messages[0].tool_call_id", "answers no pending call"),
    (row(USER, CALL, {k: v for k, v in RESULT.items() if k != "tool_call_id"}, ANSWER),
     "messages[2].tool_call_id", "missing required field messages[2].tool_call_id"),
    (row(USER, CALL, USER, ANSWER), "messages[1]",
     "messages[1] makes tool calls that no tool message answers before messages[2]: 'call_1'"),
    (row(USER, with_call(arguments={"city": "Oslo"}), RESULT, ANSWER),
     "messages[1].tool_calls[0].function.arguments",
     "must be a string holding a JSON object, got an object"),
    (row(USER, with_call(arguments="{city: Oslo}"), RESULT, ANSWER),
     "messages[1].tool_calls[0].function.arguments", "is not valid JSON"),
    (row(USER, with_call(arguments='["Oslo"]'), RESULT, ANSWER),
     "messages[1].tool_calls[0].function.arguments", "must hold a JSON object, got an array"),
    (row(USER, with_call(name="get_time"), RESULT, ANSWER, tools=[WEATHER]),
     "messages[1].tool_calls[0].function.name",
     "'get_time' is not one of the row's functions (get_weather)"),
    (row(USER, with_call(name="get weather"), RESULT, ANSWER),
     "messages[1].tool_calls[0].function.name", "letters, digits, '_' or '-'"),
    (row(USER, {"role": "assistant", "tool_calls": [{**CALLS[0], "type": "code"}]}, ANSWER),
     "messages[1].tool_calls[0].type", "must be 'function', got 'code'"),
    (row(USER, {"role": "assistant", "tool_calls": [CALLS[0], CALLS[0]]}, RESULT, ANSWER),
     "messages[1].tool_calls[1].id", "'call_1' is the id of an earlier tool call"),
    (row(USER, {"role": "assistant", "tool_calls": []}, ANSWER), "messages[1].tool_calls",
     "non-empty array, got an empty array"),
    (row(USER, {"role": "assistant", "content": None}), "messages[1].content",
     "must be a string or an array of text parts, got null"),
    (row({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, ANSWER),
     "messages[0].content[0].type", "'image_url': only text parts are accepted"),
    (row({"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]}, ANSWER),
     "messages[0].content[0].cache", "a text part takes type, text"),
    (row({"role": "user", "content": []}, ANSWER), "messages[0].content", "got an empty array"),
    (row({"role": "developer", "content": [{"type": "text", "text": " "}]}, USER, ANSWER),
     "messages[0].content", "must not be empty"),
    (row(USER, ANSWER, tools=[]), "tools", "an array of 1 to 128 items"),
    (row(USER, ANSWER, tools=[{**WEATHER, "type": "retrieval"}]), "tools[0].type",
     "must be 'function'"),
    (row(USER, ANSWER, tools=[WEATHER, WEATHER]), "tools[1].function.name", "declared twice"),
    (row(USER, ANSWER, tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters", "JSON Schema object, got an array"),
    (row(USER, ANSWER, tools=[WEATHER], functions=[WEATHER["function"]]), "functions",
     "give 'tools' or the legacy 'functions', not both"),
    (row(USER, ANSWER, parallel_tool_calls="no"), "parallel_tool_calls", "must be a boolean"),
    (row(USER, {"role": "assistant", "tool_calls": [CALLS[0], {**CALLS[0], "id": "call_2"}]},
         RESULT, {**RESULT, "tool_call_id": "call_2"}, ANSWER, parallel_tool_calls=False),
     "messages[1].tool_calls", "makes 2 tool calls, but parallel_tool_calls is false"),
    (row(USER, {"role": "assistant", "function_call": {"name": "get_weather",
                                                       "arguments": "{}"}}, ANSWER,
         tools=[WEATHER]), "messages[1].function_call", "uses function_call in a row that uses"),
    (row(USER, {"role": "function", "name": "get_weather", "content": "x"}, ANSWER),
     "messages[1].name", "answers no pending call"),
    (row(CALL, RESULT, ANSWER), "messages[0]", "messages[0] is an assistant message"),
])
def test_malformed_openai_rows_are_refused_naming_the_line_and_field(bad: str, param: str,
                                                                     fragment: str) -> None:
    datasets.parse_dataset([GOOD])  # the rows differ from a good one in the field named
    with pytest.raises(DatasetFormatError) as info:
        datasets.parse_dataset([GOOD, "", bad])
    assert (info.value.line, info.value.param) == (3, param), info.value.message
    assert fragment in info.value.message and info.value.message.startswith("line 3: ")


def test_a_call_may_go_unanswered_only_at_the_end_and_weights_stay_on_assistants() -> None:
    _, (ends_with_call,) = datasets.parse_dataset([row(USER, CALL, tools=[WEATHER])])
    assert ends_with_call.messages[-1].tool_calls[0].id == "call_1"
    with pytest.raises(DatasetFormatError) as info:
        datasets.parse_dataset([row(USER, CALL, {**RESULT, "weight": 1}, ANSWER)])
    assert info.value.param == "messages[2].weight"


def test_the_default_template_renders_tools_calls_and_results_and_masks_the_calls(
        tokenizer) -> None:
    example = tool_rows()[12]
    rendered = render_chat(tokenizer, example.messages, tools=example.tools)
    tools_line = json.dumps(example.tools[0]["function"])
    assert rendered.text == (
        f"<s><|tools|>\n{tools_line}\n<|user name=sam|>\nHello\n<|assistant|>\n"
        "Hi! Ask me about the weather.</s>\n<|user name=sam|>\nWeather in Paris and Tokyo?\n"
        '<|assistant|>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Tokyo"}}'
        "</tool_call></s>\n<|tool name=get_weather|>\n15C, rain\n<|tool name=get_weather|>\n"
        "18C, sunny\n<|assistant|>\nParis: 18C, sunny. Tokyo: 15C, rain.</s>\n")
    # The loss covers the weight-1 assistant turns, their tool calls included, and nothing else.
    assert supervised_runs(tokenizer, rendered) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Tokyo"}}</tool_call></s>\n',
        "Paris: 18C, sunny. Tokyo: 15C, rain.</s>\n"]
    assert unrendered_fields(tokenizer, DEFAULT_CHAT_TEMPLATE, tool_rows()) == ()


@pytest.mark.parametrize("index", [0, 8, 12, 18])
def test_serving_renders_openai_messages_and_tools_as_training_does(tokenizer,
                                                                    index: int) -> None:
    # Serving passes the request's messages (mappings in OpenAI's shape) and tools.
    example = tool_rows()[index]
    raw = json.loads(TOOL_SET.read_text().splitlines()[index])
    tools = raw.get("tools") or [{"type": "function", "function": f} for f in raw["functions"]]
    trained = render_chat(tokenizer, example.messages, tools=example.tools)
    assert render_chat(tokenizer, raw["messages"], tools=tools) == trained
    prompt = render_chat(tokenizer, raw["messages"][:-1], tools=tools, add_generation_prompt=True)
    assert trained.text.startswith(prompt.text) and prompt.text.endswith("<|assistant|>\n")


def test_a_tools_aware_model_template_renders_them_and_its_tool_calls_are_learned(
        tokenizer) -> None:
    hermes = copy.deepcopy(tokenizer)
    hermes.chat_template = HERMES
    example = tool_rows()[0]
    assert choose_chat_template(hermes, [example]).template == HERMES
    rendered = render_chat(hermes, example.messages, tools=example.tools)
    assert rendered.text.startswith("<|im_start|>system\n# Tools\n<tools>\n"
                                    + json.dumps(example.tools[0]) + "\n</tools><|im_end|>\n")
    assert "<tool_response>\n18C, sunny\n</tool_response>" in rendered.text
    assert supervised_runs(hermes, rendered) == [
        '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n", "It is 18C and sunny in Paris.<|im_end|>\n"]


def test_a_model_template_that_leaves_out_fields_gives_way_to_the_default(tokenizer) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = NO_TOOLS
    rows = tool_rows()
    choice = choose_chat_template(plain, rows)
    assert choice.template == DEFAULT_CHAT_TEMPLATE
    assert choice.unrendered == ("tools", "tool_calls", "name")
    chats = datasets.parse_dataset([row(USER, ANSWER)])[1]
    assert choose_chat_template(plain, chats).template == NO_TOOLS  # nothing left out
    hermes = copy.deepcopy(tokenizer)
    hermes.chat_template = HERMES
    assert choose_chat_template(hermes, rows).unrendered == ("name",)


def test_max_length_auto_is_the_models_context_and_an_integer_is_capped_by_it(
        tokenizer) -> None:
    assert tokenizer.model_max_length == 512
    assert effective_max_length(tokenizer, "auto") == 512
    assert effective_max_length(tokenizer, "auto", 64) == 64  # max_position_embeddings
    assert effective_max_length(tokenizer, 100) == 100
    assert effective_max_length(tokenizer, 4096) == 512
    unbounded = copy.deepcopy(tokenizer)
    unbounded.model_max_length = int(1e30)  # transformers' "not set"
    assert effective_max_length(unbounded, "auto") == MAX_LENGTH  # the memory cap
    for bad in (0, "long", 2.5, True):
        with pytest.raises(ConfigError) as info:
            effective_max_length(tokenizer, bad)
        assert info.value.param == "max_length"
    assert JobSpec.from_dict({"model": "m", "training_file": "t"}).hyperparameters.max_length \
        == "auto"


def test_a_function_calling_file_trains_at_auto_length_and_counts_what_exceeds_the_context(
        tokenizer, stories_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(stories_dir.parent))
    rows = tool_rows()
    lengths = [len(render_chat(tokenizer, r.messages, tools=r.tools).input_ids) for r in rows]
    assert min(lengths) > 128 and max(lengths) <= 512  # every one beyond the old default
    too_long = row({"role": "user", "content": "Weather in Oslo? " * 60}, CALL, RESULT, ANSWER,
                   tools=[WEATHER])
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(TOOL_SET.read_text() + too_long + "\n")
    spec = JobSpec.from_dict({
        "model": "stories-260k", "training_file": str(train_file), "task": "causal_lm",
        "method": {"speft": {"metric": "gradient", "density": 0.05}},
        "hyperparameters": {"n_epochs": 8, "batch_size": 20, "learning_rate": 1e-2,
                            "warmup_ratio": 0.0},  # max_length: "auto", the default
    })
    steps: list[StepReport] = []
    events: list[tuple[str, dict]] = []
    result = fine_tune(spec, device=torch.device("cpu"), callbacks=TrainCallbacks(
        on_step=steps.append, on_event=lambda message, data: events.append((message, data))))
    assert len(steps) == 8 and steps[-1].train_loss < steps[0].train_loss - 0.1
    assert [data for message, data in events
            if message == "conversations longer than max_length dropped"] == [
        {"file": "training_file", "count": 1, "lines": [21], "max_length": 512}]
    assert result.delta.metadata[CHAT_TEMPLATE_KEY] == DEFAULT_CHAT_TEMPLATE


def test_a_job_falls_back_to_the_default_template_where_the_models_leaves_out_tools(
        stories_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "stories-no-tools"
    shutil.copytree(stories_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config,
                                                             "chat_template": NO_TOOLS}))
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(TOOL_SET.read_text().splitlines(keepends=True)[:4]))
    events: list[tuple[str, dict]] = []
    result = fine_tune(JobSpec.from_dict({
        "model": str(model), "training_file": str(train_file), "task": "causal_lm",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4},
    }), device=torch.device("cpu"), callbacks=TrainCallbacks(
        on_event=lambda message, data: events.append((message, data))))
    assert ("the model's chat template leaves out fields the data uses; the default chat "
            "template is used", {"fields": ["tools", "tool_calls"]}) in events
    assert result.delta.metadata[CHAT_TEMPLATE_KEY] == DEFAULT_CHAT_TEMPLATE


def test_a_job_whose_every_conversation_exceeds_the_context_fails_naming_max_length(
        tokenizer) -> None:
    long = datasets.parse_dataset([row({"role": "user", "content": "Tell me a story. " * 80},
                                       ANSWER)])[1]
    with pytest.raises(DatasetFormatError) as info:
        tokenize_chat(long, tokenizer)  # max_length "auto": the context, 512
    assert info.value.param == "max_length" and "no conversation fits within 512" in \
        info.value.message
