"""gemma-mlx serve with the official `openai` client against a live server on a tiny pair (loopback only)."""

import concurrent.futures as futures
import contextlib
import json
import time

import httpx2 as httpx  # the HTTP client the openai package uses
import openai
import pytest

import gemma_mlx
from bench.clients import start
from gemma_mlx.server import build_app

PROMPTS = ["the quick brown fox", "why is the sky blue", "tell me about the river", "one two three four",
           "the old man and the sea", "a b c d e f", "where is the house", "what do you think"]


@contextlib.contextmanager
def live(mlx_dir, **settings):
    """A live server on loopback (uvicorn in a thread) on the tiny pair, and a second engine on the same weights to
    serve each request alone, for comparison."""
    engine = gemma_mlx.load(mlx_dir("e2blike"), drafter=mlx_dir("e2blike", ordered=True))
    app = build_app(engine, "tiny", **settings)
    url, srv, thread = start(app)
    solo = gemma_mlx.load(mlx_dir("e2blike"), drafter=mlx_dir("e2blike", ordered=True))
    yield dict(url=url, app=app, solo=solo)
    srv.should_exit = True
    thread.join(timeout=10)
    app.state.scheduler.close()


@pytest.fixture(scope="module")
def server(mlx_dir):
    with live(mlx_dir, max_batch=8, draft_tokens=3) as s:
        yield s


def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=60)


def alone(server, prompt, n=20):
    return gemma_mlx.generate(server["solo"], [{"role": "user", "content": prompt}], max_tokens=n,
                              reuse_cache=False).text


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_chat_non_streaming_equals_serving_alone(server):
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=20, temperature=0)
    assert r.choices[0].message.content == alone(server, PROMPTS[0])
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    assert r.model_extra["mtp"]["rounds"] >= 1


def test_chat_streaming_matches_non_streaming(server):
    c = client(server)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}],
                                       max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == alone(server, PROMPTS[1], 24)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].model_extra["mtp"]["rounds"] >= 1


def test_seeded_requests_share_the_batch_and_sample_what_they_sample_alone(server):
    """Each request samples from its own seed, keyed by position: concurrent seeded requests at temperature 1 join
    one batch (with an unseeded one beside them) and each gets the text it gets served alone."""
    def ask(prompt, seed):
        r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=16, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    def solo(prompt, seed):
        return gemma_mlx.generate(server["solo"], [{"role": "user", "content": prompt}], max_tokens=16,
                                  temperature=1.0, seed=seed, reuse_cache=False).text

    jobs = [(PROMPTS[i % 3], 100 + i) for i in range(5)] + [(PROMPTS[5], None)]
    with futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda a: ask(*a), jobs))
    assert texts[:5] == [solo(p, s) for p, s in jobs[:5]]
    assert len(set(texts[:3])) == 3 and texts[0] != solo(PROMPTS[0], 7)
    assert len([p for p, _ in server["app"].state.scheduler.batches if p.temperature == 1.0]) == 1  # not one a seed


def test_top_k_and_min_p_are_applied(server):
    """top_k 1 (and min_p 1) keep only the most likely token: a request at temperature 2 gets the greedy text."""
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[2]}],
                                                   max_tokens=20, temperature=2.0, seed=5, extra_body=extra)
        assert r.choices[0].message.content == alone(server, PROMPTS[2]), extra


def test_any_model_name_is_served_by_the_loaded_model(server):
    r = client(server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=20, temperature=0)
    assert r.model == "tiny" and r.choices[0].message.content == alone(server, PROMPTS[0])


def test_stream_options_include_usage_sends_a_last_chunk_with_the_usage(server):
    chunks = list(client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == alone(server, PROMPTS[3], 12)


def test_mtp_can_be_turned_off_or_fixed_per_request(server):
    def ask(**extra):
        r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[4]}],
                                                   max_tokens=16, temperature=0, extra_body=extra)
        return r.choices[0].message.content, r.model_extra["mtp"]

    plain_text, plain = ask(mtp=False)
    fixed_text, fixed = ask(draft_tokens=2)
    assert plain_text == fixed_text == alone(server, PROMPTS[4], 16)
    assert plain["acceptance_by_position"] == [] and plain["rounds"] == 15  # no drafts: one token a round
    assert fixed["acceptance_by_position"]  # drafts were tried, in a batch of its own K
    assert {setting for _, setting in server["app"].state.scheduler.batches} >= {0, 2}


def test_a_resent_conversation_prefills_only_its_new_tokens(server):
    """An agent's next turn resends the conversation: it starts from the kept cache of the previous request
    (usage.prompt_tokens_details.cached_tokens) and answers what a cold start answers."""
    c = client(server)
    messages = [{"role": "user", "content": "tell me everything about the river and the old house"}]
    previous = 0  # the whole previous prompt is a prefix of this one (the reply may retokenize differently)
    for turn in range(3):
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        cold = gemma_mlx.generate(server["solo"], messages, max_tokens=12, reuse_cache=False)
        assert r.choices[0].message.content == cold.text
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert previous <= cached < r.usage.prompt_tokens, (turn, cached, r.usage.prompt_tokens)
        previous = r.usage.prompt_tokens
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": f"and then {turn}?"}]


def test_completions_endpoint_and_stop_strings(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text.split()[2] if len(text.split()) > 2 else text[-2:]
    cut = c.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_eight_concurrent_requests_each_equal_their_solo_run(server):
    c = client(server)

    def ask(p):
        return c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=20,
                                         temperature=0).choices[0].message.content

    with futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, PROMPTS))
    assert got == [alone(server, p) for p in PROMPTS]


def test_a_client_that_disconnects_frees_its_row(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    scheduler = server["app"].state.scheduler
    for _ in range(100):
        if not any(d.rows for d, _ in scheduler.batches.values()):
            break
        time.sleep(0.05)
    assert not any(d.rows for d, _ in scheduler.batches.values())
    assert client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, temperature=0).usage.completion_tokens == 3


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": 4, "messages": [{"role": "user", "content": "hi"}]}, 400, "model must be a string"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "exceeds the context"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}, 400, "top_k"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "min_p": 3}, 400, "min_p"),
])
def test_bad_requests_get_the_openai_error_shape(server, body, status, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server["url"] + "/v1/chat/completions", content=data,
                   headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and {"message", "type", "param", "code"} <= set(err)
    assert httpx.get(server["url"] + "/health").status_code == 200  # still alive


def test_32_clients_with_cancellations_against_a_batch_of_8(mlx_dir):
    """32 concurrent clients, prompts of 5 to ~80 tokens (past the sliding window), every fourth streaming and gone
    after three chunks: each completed reply equals the request served alone, none lost or answered twice, no row
    left behind, and the prefix cache within its limit (set to hold a few requests, so it evicts)."""
    with live(mlx_dir, max_batch=8, draft_tokens="auto", cache_mb=2) as srv:
        c = client(srv)
        prompts = [" ".join([PROMPTS[i % 8]] * (1 + i % 5)) + f" {i}" for i in range(32)]

        def ask(i):
            messages = [{"role": "user", "content": prompts[i]}]
            if i % 4 == 3:
                body = {"model": "tiny", "messages": messages, "max_tokens": 200, "temperature": 0, "stream": True}
                with httpx.stream("POST", srv["url"] + "/v1/chat/completions", json=body, timeout=60) as r:
                    for n, _ in enumerate(r.iter_lines()):
                        if n > 4:
                            return i, None
            r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8 + i % 17, temperature=0)
            return i, (r.id, r.choices[0].message.content, r.usage.completion_tokens)

        t0 = time.perf_counter()
        with futures.ThreadPoolExecutor(32) as pool:
            answers = dict(pool.map(ask, range(32)))
        seconds = time.perf_counter() - t0
        done = {i: a for i, a in answers.items() if a is not None}
        assert len(done) == 24 and len({a[0] for a in done.values()}) == 24  # none lost, none answered twice
        wrong = [(i, a[1], alone(srv, prompts[i], 8 + i % 17)) for i, a in done.items()
                 if a[1] != alone(srv, prompts[i], 8 + i % 17)]
        assert not wrong, wrong
        scheduler = srv["app"].state.scheduler
        for _ in range(100):
            if not any(d.rows for d, _ in scheduler.batches.values()):
                break
            time.sleep(0.05)
        assert not any(d.rows or jobs for d, jobs in scheduler.batches.values())
        kept = scheduler.prefix_cache
        assert 0 < kept.nbytes <= kept.limit and 0 < len(kept.entries) < 32  # 2 MB holds 5 of the 32 here
        print(f"32 clients (8 cancelled) at max_batch 8: {sum(a[2] for a in done.values()) / seconds:.0f} tok/s "
              f"aggregate (CPU, tiny model); prefix cache {kept.nbytes} of {kept.limit} bytes, {len(kept.entries)} "
              "sequences")


def test_a_full_queue_is_a_429_with_retry_after(mlx_dir):
    """max_batch 1 queues at most QUEUE_PER_ROW requests; the rest are told when to come back, not kept waiting."""
    from gemma_mlx.server import QUEUE_PER_ROW

    with live(mlx_dir, max_batch=1, draft_tokens=0) as srv:
        def ask(i):
            body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[i % 8]}], "max_tokens": 120,
                    "temperature": 0}
            return httpx.post(srv["url"] + "/v1/chat/completions", json=body, timeout=120)

        with futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(ask, range(12)))
        busy = [r for r in replies if r.status_code == 429]
        assert len(busy) >= 12 - (1 + QUEUE_PER_ROW) - 2 and all(r.status_code == 200 for r in replies
                                                                  if r not in busy)
        assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
                   for r in busy)
        assert ask(0).status_code == 200  # served again once the queue drained


@contextlib.contextmanager
def http_on(engine):
    """An in-process client of a server on `engine` (starlette's TestClient: no socket)."""
    from starlette.testclient import TestClient

    app = build_app(engine, "tiny", max_batch=2, draft_tokens=0)
    try:
        with TestClient(app) as http:
            yield http
    finally:
        app.state.scheduler.close()


def test_chat_messages_to_a_checkpoint_without_a_chat_template_are_a_400(mlx_dir):
    """The checkpoint can still complete text (/v1/completions); chat says so in OpenAI's error shape."""
    engine = gemma_mlx.load(mlx_dir("e2blike"))
    engine.tokenizer._tokenizer.chat_template = None
    with http_on(engine) as http:
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "no chat template" in err["message"]
        assert "--raw" not in err["message"] and "/v1/completions" in err["message"]
        r = http.post("/v1/completions", json={"prompt": "one two", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_messages_the_chat_template_refuses_are_a_400(mlx_dir):
    """Gemma 3's template (what the converter gives a GGUF without one) raises on roles that do not alternate."""
    from gemma_mlx.convert.gguf import GEMMA3_CHAT

    engine = gemma_mlx.load(mlx_dir("e2blike"))
    engine.tokenizer._tokenizer.chat_template = GEMMA3_CHAT
    with http_on(engine) as http:
        r = http.post("/v1/chat/completions", json={"messages": [
            {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "messages" and "chat template refused" in r.json()["error"]["message"]


# --- fuzz: malformed requests, each a 4xx in OpenAI's error shape, the server still serving ------------------------

OK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
MALFORMED = [  # (method, route, body: bytes or a dict merged into OK (None drops a key), status, param)
    ("POST", CHAT, b"{not json", 400, None),
    ("POST", CHAT, b"", 400, None),
    ("POST", CHAT, b"\xff\xfe{\x00", 400, None),
    ("POST", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("POST", CHAT, b"[]", 400, None),
    ("POST", CHAT, b"42", 400, None),
    ("POST", CHAT, b'"hi"', 400, None),
    ("POST", CHAT, b"null", 400, None),
    ("POST", CHAT, {"messages": None}, 400, "messages"),
    ("POST", CHAT, {"messages": "hi"}, 400, "messages"),
    ("POST", CHAT, {"messages": []}, 400, "messages"),
    ("POST", CHAT, {"messages": [1]}, 400, "messages[0]"),
    ("POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("POST", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, 400,
     "messages[1].role"),
    ("POST", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages"),  # a text-only checkpoint: no vision tower
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}, 400,
     "messages"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"max_tokens": -5}, 400, "max_tokens"),
    ("POST", CHAT, {"max_tokens": 0}, 400, "max_tokens"),
    ("POST", CHAT, {"max_tokens": "ten"}, 400, "max_tokens"),
    ("POST", CHAT, {"max_tokens": 1.5}, 400, "max_tokens"),
    ("POST", CHAT, {"max_tokens": True}, 400, "max_tokens"),
    ("POST", CHAT, {"max_tokens": None, "max_completion_tokens": -1}, 400, "max_tokens"),
    ("POST", CHAT, {"max_tokens": 10**9}, 400, "messages"),
    ("POST", CHAT, {"temperature": -1}, 400, "temperature"),
    ("POST", CHAT, {"temperature": "hot"}, 400, "temperature"),
    ("POST", CHAT, {"temperature": 3}, 400, "temperature"),
    ("POST", CHAT, {"temperature": True}, 400, "temperature"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "top_p"),
    ("POST", CHAT, {"top_p": 5}, 400, "top_p"),
    ("POST", CHAT, {"top_p": 0}, 400, "top_p"),
    ("POST", CHAT, {"top_p": "x"}, 400, "top_p"),
    ("POST", CHAT, {"stop": 5}, 400, "stop"),
    ("POST", CHAT, {"stop": [1, 2]}, 400, "stop"),
    ("POST", CHAT, {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", CHAT, {"stop": [""]}, 400, "stop"),
    ("POST", CHAT, {"stop": {"a": 1}}, 400, "stop"),
    ("POST", CHAT, {"seed": "x"}, 400, "seed"),
    ("POST", CHAT, {"mtp": "no"}, 400, "mtp"),
    ("POST", CHAT, {"draft_tokens": 99}, 400, "draft_tokens"),
    ("POST", CHAT, {"draft_tokens": "many"}, 400, "draft_tokens"),
    ("POST", CHAT, {"stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ("POST", CHAT, {"stream_options": []}, 400, "stream_options"),
    ("POST", CHAT, {"seed": 1.5}, 400, "seed"),
    ("POST", CHAT, {"n": 2}, 400, "n"),
    ("POST", CHAT, {"n": 0}, 400, "n"),
    ("POST", CHAT, {"n": "1"}, 400, "n"),
    ("POST", CHAT, {"stream": "yes"}, 400, "stream"),
    ("POST", CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("POST", CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, 400, "tools[0]"),
    ("POST", CHAT, {"tools": "f"}, 400, "tools"),
    ("POST", CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
     400, "messages[0].tool_calls"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "' + b"x" * (10 * 2**20) + b'"}]}', 413, None),
    ("POST", CHAT, {"logprobs": True}, 400, "logprobs"),
    ("POST", CHAT, {"frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ("POST", TEXT, {"messages": None}, 400, "prompt"),
    ("POST", TEXT, {"messages": None, "prompt": 5}, 400, "prompt"),
    ("POST", TEXT, {"messages": None, "prompt": ""}, 400, "prompt"),
    ("POST", TEXT, {"messages": None, "prompt": ["a", "b"]}, 400, "prompt"),
    ("GET", CHAT, None, 405, None),
    ("PUT", TEXT, None, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
    ("GET", "/nope", None, 404, None),
    ("POST", "/v1/embeddings", {}, 404, None),
    ("GET", "/v1", None, 404, None),
    ("GET", "/v1/chat/completions/extra", None, 404, None),
]


def request_body(body):
    if body is None or isinstance(body, bytes):
        return body
    return json.dumps({k: v for k, v in {**OK, **body}.items() if v is not None}).encode()


@pytest.fixture(scope="module")
def fuzz_http(mlx_dir):
    from starlette.testclient import TestClient

    app = build_app(gemma_mlx.load(mlx_dir("e2blike")), "tiny", max_batch=2, draft_tokens=0)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http
    app.state.scheduler.close()


def test_malformed_requests_are_4xx_json_naming_the_field(fuzz_http):
    """Every malformed request gets OpenAI's error shape with the right status and `param`; none reaches the
    scheduler or kills the server, which answers a good request afterwards."""
    failures = []
    for method, route, body, status, param in MALFORMED:
        r = fuzz_http.request(method, route, content=request_body(body), headers={"content-type": "application/json"})
        try:
            err = r.json()["error"]
            ok = r.status_code == status and set(err) == {"message", "type", "param", "code"} and err["message"]
            ok = ok and (param is None or err["param"] == param) and "Traceback" not in r.text
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{method} {route} {request_body(body)!r:.80}: {r.status_code} {r.text[:200]}")
    print(f"{len(MALFORMED)} malformed requests, {len(MALFORMED) - len(failures)} answered 4xx JSON")
    assert len(MALFORMED) >= 40 and not failures, "\n".join(failures)
    r = fuzz_http.post(CHAT, json={**OK, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_500_carries_no_traceback(fuzz_http, monkeypatch):
    from gemma_mlx import server

    monkeypatch.setattr(server, "check_unsupported", lambda body: 1 / 0)
    r = fuzz_http.post(CHAT, json=OK)
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal server error", "type": "server_error",
                                                          "param": None, "code": None}
    assert "ZeroDivision" not in r.text


def test_a_quantized_drafter_serves_from_the_worker_thread(mlx_dir):
    """On the CPU a quantized drafter is dequantized at load; its weights must be computed there, not left as a
    graph for the server's worker thread (MLX streams are per thread: that failed every request with a 500)."""
    from starlette.testclient import TestClient

    engine = gemma_mlx.load(mlx_dir("e2blike"), drafter=mlx_dir("e2blike", quantize=4, ordered=True))
    app = build_app(engine, "tiny", max_batch=2, draft_tokens=2)
    try:
        with TestClient(app) as http:
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 6 and r.json()["mtp"]["rounds"] >= 1
    finally:
        app.state.scheduler.close()


def test_a_request_whose_prefill_fails_gets_a_500_and_the_server_goes_on(mlx_dir, monkeypatch):
    """An exception in a new row's prefill fails that request (it was in no batch yet, so nothing else told it: it
    used to wait forever), and the next request is served."""
    from gemma_mlx.decode import Decoder

    real_add, calls = Decoder.add, []

    def add_failing_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("prefill failed")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "add", add_failing_once)
    with http_on(gemma_mlx.load(mlx_dir("e2blike"))) as http:
        r = http.post("/v1/chat/completions", json={**OK, "temperature": 0})
        assert r.status_code == 500 and "prefill failed" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={**OK, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
