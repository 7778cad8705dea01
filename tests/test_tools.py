"""Tool calls: OpenAI tools into the chat template, Gemma 4's call format out of the reply (recorded outputs), and
the server's tool_calls with the official `openai` client, whole and streamed."""

import json
import shutil
from types import SimpleNamespace

import openai
import pytest

import gemma_mlx
from gemma_mlx.openai_request import BadRequest, chat_messages, tool_use
from gemma_mlx.server import build_app, request_prompt
from gemma_mlx.speculative import Stats
from gemma_mlx.tool_calls import ToolCallText, ToolUse

from oracle import save_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}

# Replies in Gemma 4's format (as its template writes calls and as the model emits them, `<|"|>` quoting strings)
ONE_CALL = '<|tool_call>call:get_weather{city:<|"|>Paris, {FR}<|"|>,days:3,metric:true}<tool_call|>'
TWO_CALLS = ('Let me check both.<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
             '<|tool_call>call:get_time{zone:<|"|>Europe/Oslo<|"|>,opts:{dst:false},tags:[<|"|>a<|"|>,1]}<tool_call|>')
CUT_OFF = 'Sure.<|tool_call>call:get_weather{city:<|"|>Par'
MALFORMED = 'Here: <|tool_call>call:get_weather{city: Paris,,}<tool_call|> done'


@pytest.fixture(scope="module")
def tools_engine(mlx_dir, tmp_path_factory):
    """The tiny target with a Gemma 4-style tokenizer: Gemma 4's tool tokens and a template in its tool format."""
    d = tmp_path_factory.mktemp("g4tools") / "target"
    shutil.copytree(mlx_dir("e2blike"), d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    save_tokenizer(d, gemma4_tools=True)
    return gemma_mlx.load(d)


def split(tokenizer, text, use=ToolUse([WEATHER, TIME]), step=None):
    """(content, calls) of a reply given whole, or `step` characters at a time."""
    calls = ToolCallText.of(tokenizer, use)
    pieces = [text] if step is None else [text[i : i + step] for i in range(0, len(text), step)]
    content, found = "", []
    for p in pieces[:-1]:
        c, new = calls.add(p)
        content, found = content + c, found + new
    c, new = calls.finish(pieces[-1] if pieces else "")
    return content + c, [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in found + new]


def test_the_tokenizer_wrapper_finds_gemma4s_format_in_the_template(tools_engine):
    tok = tools_engine.tokenizer
    assert tok.has_tool_calling and (tok.tool_call_start, tok.tool_call_end) == ("<|tool_call>", "<tool_call|>")


def test_recorded_calls_parse_into_openai_tool_calls(tools_engine):
    tok = tools_engine.tokenizer
    assert split(tok, ONE_CALL) == ("", [("get_weather", {"city": "Paris, {FR}", "days": 3, "metric": True})])
    assert split(tok, TWO_CALLS) == ("Let me check both.", [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "Europe/Oslo", "opts": {"dst": False},
                                                         "tags": ["a", 1]})])
    assert split(tok, "no call here") == ("no call here", [])


def test_streamed_a_character_at_a_time_gives_the_same_split(tools_engine):
    """Content is given out as it comes, but never a marker's first characters (they may start a call)."""
    tok = tools_engine.tokenizer
    for text in (ONE_CALL, TWO_CALLS, CUT_OFF, MALFORMED, "a < b and <|tool x"):
        assert split(tok, text, step=1) == split(tok, text) == split(tok, text, step=7)
    calls = ToolCallText.of(tok, ToolUse([WEATHER]))
    assert calls.add("Sure.<|tool") == ("Sure.", []) and calls.add("_cal") == ("", [])


def test_a_cut_off_or_malformed_call_stays_content_as_written(tools_engine):
    tok = tools_engine.tokenizer
    assert split(tok, CUT_OFF) == (CUT_OFF, [])
    assert split(tok, MALFORMED) == (MALFORMED, [])


def test_a_forced_opening_and_parallel_calls_off(tools_engine):
    tok = tools_engine.tokenizer
    use = tool_use({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                   tok, chat=True)
    assert use.prefix == "<|tool_call>call:get_weather{"
    assert split(tok, 'city:<|"|>Rome<|"|>}<tool_call|>', use) == ("", [("get_weather", {"city": "Rome"})])
    assert tool_use({"tools": [WEATHER], "tool_choice": "required"}, tok, True).prefix == "<|tool_call>call:"
    assert tool_use({"tools": [WEATHER], "tool_choice": "none"}, tok, True) is None
    single = tool_use({"tools": [WEATHER, TIME], "parallel_tool_calls": False}, tok, True)
    assert split(tok, TWO_CALLS, single) == ("Let me check both.", [("get_weather", {"city": "Oslo"})])


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"},
]


def test_tools_and_tool_results_go_through_the_template_as_transformers_renders_them(tools_engine):
    """The prompt of an OpenAI request with tools, an earlier call (arguments as a JSON string) and its result is
    the tokens transformers' apply_chat_template gives for the same conversation."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tools_engine.tokenizer._tokenizer.name_or_path)
    body = {"messages": CONVERSATION, "tools": [WEATHER, TIME]}
    ours, _ = request_prompt(body, tools_engine, True, tool_use(body, tools_engine.tokenizer, True))
    conversation = json.loads(json.dumps(CONVERSATION))
    conversation[1]["content"] = ""
    conversation[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = hf.apply_chat_template(conversation, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    assert ours == list(expected)
    text = hf.decode(ours)
    assert "declaration:get_time" in text and "call:get_weather{city:" in text and "response:get_weather" in text
    forced = {**body, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    prompt, _ = request_prompt(forced, tools_engine, True, tool_use(forced, tools_engine.tokenizer, True))
    assert prompt[: len(ours)] == ours and hf.decode(prompt[len(ours):]) == "<|tool_call>call:get_time{"


@pytest.mark.parametrize("body,param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "an object"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0]"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "unknown"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_name_the_field(tools_engine, body, param):
    with pytest.raises(BadRequest) as e:
        tool_use(body, tools_engine.tokenizer, chat=True)
    assert e.value.param == param


@pytest.mark.parametrize("messages,param", [
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}],
     "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": {"function": {}}}], "messages[0].tool_calls"),
    ([{"role": "tool", "content": "x", "tool_call_id": 5}], "messages[0].tool_call_id"),
])
def test_bad_tool_messages_name_the_field(messages, param):
    with pytest.raises(BadRequest) as e:
        chat_messages(messages)
    assert e.value.param == param


@pytest.fixture(scope="module")
def tools_server(tools_engine):
    """The server over HTTP (starlette's TestClient) whose scheduler replays a recorded reply instead of decoding:
    what the HTTP layer makes of Gemma 4's output, seen by the official client."""
    from starlette.testclient import TestClient

    app = build_app(tools_engine, "tiny", max_batch=2, draft_tokens=0)
    scheduler = app.state.scheduler
    real_submit, replies, jobs = scheduler.submit, [], []

    def replay(job):
        jobs.append(job)
        if not replies:
            return real_submit(job)
        pieces = replies.pop(0)
        job.row = SimpleNamespace(tokens=list(range(len(pieces))), stats=Stats(prefill_tokens=len(job.prompt)))
        for i, piece in enumerate(pieces):
            job.loop.call_soon_threadsafe(job.updates.put_nowait, (piece, "stop" if i == len(pieces) - 1 else None))

    scheduler.submit = replay
    with TestClient(app) as http:
        yield SimpleNamespace(client=openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http,
                                                   max_retries=0), replies=replies, jobs=jobs)
    scheduler.close()


def pieces_of(text, n=5):
    return [text[i : i + n] for i in range(0, len(text), n)]


def test_the_server_returns_tool_calls_to_the_openai_client(tools_server):
    tools_server.replies.append(pieces_of(TWO_CALLS))
    r = tools_server.client.chat.completions.create(model="x", messages=CONVERSATION[:1], tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check both."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "Europe/Oslo", "opts": {"dst": False},
                                                         "tags": ["a", 1]})]
    assert all(c.type == "function" and c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    assert tools_server.jobs[-1].stops[-1] == "<|tool_response>"  # where the model would wait for the result


def test_the_server_streams_tool_calls_as_delta_tool_calls(tools_server):
    tools_server.replies.append(pieces_of(TWO_CALLS, 3))
    chunks = list(tools_server.client.chat.completions.create(model="x", messages=CONVERSATION[:1],
                                                              tools=[WEATHER, TIME], stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert content == "Let me check both." and "<|" not in content
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Oslo"}), (1, "get_time", {"zone": "Europe/Oslo", "opts": {"dst": False},
                                                               "tags": ["a", 1]})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_malformed_tool_output_is_plain_content_never_a_500(tools_server):
    for stream in (False, True):
        tools_server.replies.append(pieces_of(MALFORMED))
        r = tools_server.client.chat.completions.create(model="x", messages=CONVERSATION[:1], tools=[WEATHER],
                                                        stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == MALFORMED and chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert r.choices[0].message.content == MALFORMED and not r.choices[0].message.tool_calls
            assert r.choices[0].finish_reason == "stop"


def test_a_decoded_reply_with_tools_and_a_forced_call_comes_back_whole(tools_server):
    """Real decoding (the tiny model's random text): the request with tools and a tool result in its history is
    served, the forced opening is in the prompt, and the cut-off call comes back as content."""
    r = tools_server.client.chat.completions.create(model="x", messages=CONVERSATION, tools=[WEATHER], max_tokens=6,
                                                    temperature=0, tool_choice="required")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.choices[0].message.content.startswith("<|tool_call>call:")
