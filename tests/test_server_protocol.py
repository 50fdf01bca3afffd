"""The server as OpenAI's and vLLM's behave: malformed bodies are 4xx in OpenAI's error shape, stop
strings never reach the client, usage is exact, the sampling parameters that change the result are
implemented (or refused by name), and a client that leaves stops its work."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from epd.config import ModelConfig, RunConfig
from epd.models.tokenizer import ByteTokenizer
from epd.serve.async_llm import AsyncLLM
from epd.serve.text_stream import TextStream
from tests.serving import DEPLOYMENT, _serve, _wait_drained, png_data_url

MSG = [{"role": "user", "content": "tell me a long story"}]
GREEDY = dict(model="tiny-llava", messages=MSG, temperature=0, extra_body={"ignore_eos": True})
# The random model emits arbitrary bytes; a bias towards a few letters makes its greedy text printable.
LETTERS = {str(ord(c) + 4): 20.0 for c in "abcdefg"}


@pytest.fixture(scope="module")
def live(engine):
    srv = _serve(engine, max_body_bytes=2_000_000)
    yield srv
    srv.stop()


@pytest.fixture()
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def _post(live, path, body, **kw):
    return httpx.post(live.url + path, json=body, timeout=60, **kw)


def _printable_window(text: str, start: int, n: int) -> str:
    for i in range(start, len(text) - n):
        w = text[i : i + n]
        if "\ufffd" not in w and w.isprintable() and text.find(w) == i:
            return w
    pytest.skip("the random model produced no printable window")


MALFORMED = [
    ("text part without text", [{"type": "text"}], "messages.0.content.0.text"),
    ("image part without image_url", [{"type": "image_url"}], "messages.0.content.0.image_url"),
    ("url as an integer", [{"type": "image_url", "image_url": {"url": 7}}], "messages.0.content.0.image_url.url"),
    ("image_url as a string", [{"type": "image_url", "image_url": "data:x"}], "messages.0.content.0.image_url"),
    ("text as a list", [{"type": "text", "text": ["a"]}], "messages.0.content.0.text"),
    ("video part", [{"type": "video_url", "video_url": {"url": "x"}}], "video_url"),
    ("part without type", [{"text": "hi"}], "type"),
    ("unknown detail", [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}], "detail"),
    ("extra key in a part", [{"type": "text", "text": "a", "cache_control": {}}], "cache_control"),
]


@pytest.mark.parametrize("name,content,where", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_content_parts_are_400_naming_the_field(live, engine, name, content, where):
    resp = _post(live, "/v1/chat/completions", {"model": "tiny-llava", "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert where in (err["param"] or "") + " " + err["message"], err
    assert err["type"] == "invalid_request_error"


UNSUPPORTED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"min_p": 0.1}, "min_p"),
    ({"store": True}, "store"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 300}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"seed": 2**63}, "seed"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
]


@pytest.mark.parametrize("extra,param", UNSUPPORTED, ids=[u[1] + str(i) for i, u in enumerate(UNSUPPORTED)])
def test_parameters_not_implemented_are_refused_by_name(live, extra, param):
    body = {"model": "tiny-llava", "messages": MSG, "max_tokens": 2, **extra}
    resp = _post(live, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert param in (err["param"] or "") + " " + err["message"], err


def test_accepted_no_op_forms_of_those_fields(client):
    out = client.chat.completions.create(
        max_tokens=3, response_format={"type": "text"}, tools=[], tool_choice="none", user="u", **GREEDY
    )  # fmt: skip
    assert out.usage.completion_tokens == 3


def test_unknown_model_is_404_and_routes_errors_are_openai_shaped(live, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MSG, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    for resp, status in [
        (httpx.get(live.url + "/v1/nothing"), 404),
        (httpx.get(live.url + "/v1/chat/completions"), 405),
        (
            httpx.post(
                live.url + "/v1/chat/completions", content=b'{"messages": "\xff\xfe"}', headers={"content-type": "application/json"}
            ),
            400,
        ),
        (httpx.post(live.url + "/v1/chat/completions", content=b"not json", headers={"content-type": "application/json"}), 400),
    ]:
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text


def test_body_limit_is_413_before_parsing(live, engine):
    big = {"model": "tiny-llava", "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    t0 = time.time()
    resp = _post(live, "/v1/chat/completions", big)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(
        live.url + "/v1/chat/completions", content=iter([b'{"messages": [{"role": "user", "content": "', b"y" * 2_500_000, b'"}]}']),
        headers={"content-type": "application/json"}, timeout=60,
    )  # fmt: skip
    assert chunked.status_code == 413, chunked.text
    assert time.time() - t0 < 10
    _wait_drained(engine)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_are_never_emitted_and_usage_is_exact(client, engine, stream):
    full = client.chat.completions.create(max_tokens=48, logit_bias=LETTERS, **GREEDY)
    text = full.choices[0].message.content
    stop = _printable_window(text, 3, 4)
    cut = text.index(stop)
    kw = dict(max_tokens=48, stop=[stop, "\u2603never"], logit_bias=LETTERS, **GREEDY)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        got, finish, use = "".join(pieces), [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage
        for i in range(len(pieces)):  # at no point was any part of the stop string shown past the cut
            assert len("".join(pieces[: i + 1])) <= cut
    else:
        out = client.chat.completions.create(**kw)
        got, finish, use = out.choices[0].message.content, out.choices[0].finish_reason, out.usage
    assert got == text[:cut] and finish == "stop"
    assert use.prompt_tokens == full.usage.prompt_tokens > 0
    assert cut + len(stop) <= use.completion_tokens < full.usage.completion_tokens  # byte tokens: one per byte
    _wait_drained(engine)


def test_text_stream_holds_back_partial_stops():
    tok = ByteTokenizer(512, set())
    ts = TextStream(tok, ["abc", "bd"])
    shown = [ts.add(tok.encode(ch)).text for ch in "xyabxab"]
    assert "".join(shown) == "xyabx" and shown[2:4] == ["", ""]  # 'ab' held until 'x' rules out 'abc'
    assert ts.add(tok.encode("c")).text == "" and ts.stopped and ts.output == "xyabx"
    ts = TextStream(tok, ["ab"])
    ts.add(tok.encode("za"))
    assert ts.finish().text == "a" and ts.output == "za"  # released once the request ends
    ts = TextStream(tok, [])
    e = tok.encode("é")  # two byte tokens
    assert ts.add(e[:1]).text == "" and ts.output == ""  # half a UTF-8 character waits
    assert ts.add(e[1:]).text == "é"


def test_tiny_temperature_is_greedy_and_logit_bias_and_penalties_apply(client):
    greedy = client.chat.completions.create(max_tokens=10, **GREEDY)
    tiny = client.chat.completions.create(max_tokens=10, **{**GREEDY, "temperature": 5e-324})
    assert tiny.choices[0].message.content == greedy.choices[0].message.content
    forced = client.chat.completions.create(max_tokens=6, logit_bias={str(ord("=") + 4): 100}, **GREEDY)
    assert forced.choices[0].message.content == "=" * 6
    rep = client.chat.completions.create(max_tokens=24, frequency_penalty=2, presence_penalty=2, **GREEDY)
    plain = client.chat.completions.create(max_tokens=24, **GREEDY)
    assert len(set(rep.choices[0].message.content)) >= len(set(plain.choices[0].message.content))
    assert rep.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_and_top_logprobs(client, stream):
    kw = dict(max_tokens=9, logprobs=True, top_logprobs=3, **GREEDY)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        n = chunks[-1].usage.completion_tokens
    else:
        out = client.chat.completions.create(**kw)
        entries, n = out.choices[0].logprobs.content, out.usage.completion_tokens
    assert len(entries) == n == 9
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6  # greedy takes the most likely token
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob


def test_n_choices_are_seeded_and_counted(client):
    kw = dict(model="tiny-llava", messages=MSG, max_tokens=8, temperature=1.0, n=3, seed=11, extra_body={"ignore_eos": True})
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == client.chat.completions.create(**{**kw, "n": 1}).usage.prompt_tokens
    chunks = list(client.chat.completions.create(stream=True, **kw))
    by_index = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
    assert [by_index[i] for i in range(3)] == [c.message.content for c in a.choices]


def test_completions_endpoint(live, client):
    prompt = "once upon a time"
    out = client.completions.create(
        model="tiny-llava", prompt=prompt, max_tokens=7, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens == len(prompt.encode()) + 1  # byte tokens and BOS
    lp = out.choices[0].logprobs
    # the legacy shape keys alternatives by their text: bytes that decode alike share a key
    assert len(lp.tokens) == len(lp.token_logprobs) == 7 and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    ids = ByteTokenizer(512, set()).encode(prompt)
    same = client.completions.create(model="tiny-llava", prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert same.choices[0].text == out.choices[0].text
    two = client.completions.create(model="tiny-llava", prompt=[prompt, "other"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.choices[0].text == two.choices[1].text
    text = "".join(c.choices[0].text for c in client.completions.create(model="tiny-llava", prompt=prompt, max_tokens=7, temperature=0,
                                                                        stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    assert text == out.choices[0].text
    for body in ({"prompt": prompt, "echo": True}, {"prompt": prompt, "suffix": "x"}, {"prompt": prompt, "best_of": 3}, {"prompt": []}):
        resp = _post(live, "/v1/completions", {"model": "tiny-llava", **body})
        assert resp.status_code == 400, resp.text


def test_non_streaming_client_that_leaves_aborts_its_request(live, engine):
    body = {"model": "tiny-llava", "messages": MSG, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    t0 = time.time()
    _wait_drained(engine, timeout=10)
    assert time.time() - t0 < 5  # aborted, not run to its 3000 tokens
    assert any(o.abort_reason == "cancelled by the client" and len(o.token_ids) < 3000 for o in engine.core.pipeline.outputs.values())


def test_one_odd_request_among_concurrent_ones_harms_none(client, engine):
    def one(i):
        extra = {"top_k": 10**30} if i == 5 else {}
        return client.chat.completions.create(
            model="tiny-llava", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5, temperature=1, seed=i,
            extra_body={"ignore_eos": True, **extra},
        )  # fmt: skip

    with ThreadPoolExecutor(13) as pool:
        outs = list(pool.map(one, range(13)))
    assert all(o.usage.completion_tokens == 5 for o in outs)
    _wait_drained(engine)


def test_streams_keep_flowing_while_a_large_prompt_is_tokenised(live, engine):
    """Tokenisation runs off the event loop and the engine thread: a big prompt (refused for its length
    once tokenised) does not stall a running stream."""
    gaps, stop = [], threading.Event()

    def stream():
        body = {"model": "tiny-llava", "messages": MSG, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        last = None
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                now = time.time()
                if line.startswith("data: ") and last is not None and not stop.is_set():
                    gaps.append(now - last)
                last = now

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    big = {"model": "tiny-llava", "messages": [{"role": "user", "content": "z" * 1_800_000}], "max_tokens": 2}
    resp = _post(live, "/v1/chat/completions", big)
    stop.set()
    t.join(60)
    assert resp.status_code == 400 and "context" in resp.json()["error"]["message"]
    assert gaps and max(gaps) < 2.0, max(gaps)
    _wait_drained(engine)


def test_an_engine_failure_is_a_500_without_internals(monkeypatch):
    """A request whose work fails inside a worker gets a 500 that names nothing internal; the requests
    running beside it are served."""
    import epd.engine.worker as worker

    real = worker.sample_full

    def flaky(logits, params, steps, **kw):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("device exploded at 0xdeadbeef (pid 1234)")
        return real(logits, params, steps, **kw)

    monkeypatch.setattr(worker, "sample_full", flaky)
    llm = AsyncLLM(ModelConfig(), DEPLOYMENT, "local")
    live = _serve(llm)
    try:
        cli = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)

        def one(seed):
            try:
                return cli.chat.completions.create(model="tiny-llava", messages=MSG, max_tokens=4, temperature=1, seed=seed)
            except openai.InternalServerError as exc:
                return exc

        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(one, [1, 2, 666, 3, 4, 5]))
        failed = outs[2]
        assert isinstance(failed, openai.InternalServerError)
        assert failed.body["type"] == "server_error"
        for leak in ("pid", "0xdead", "Traceback", "RuntimeError", "worker"):
            assert leak not in failed.body["message"]
        assert all(not isinstance(o, Exception) and o.usage.completion_tokens >= 1 for i, o in enumerate(outs) if i != 2)
    finally:
        live.stop()
        llm.close()


def test_images_and_text_prepared_off_the_loop_give_the_same_answer(client):
    msg = [
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": png_data_url(97, 31)}}]}
    ]
    a = client.chat.completions.create(model="tiny-llava", messages=msg, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model="tiny-llava", messages=msg, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage.prompt_tokens > 16


def test_async_llm_refuses_a_second_stream_with_the_same_id(engine):
    from epd.request import Request, SamplingParams

    async def go():
        req = Request("same-id", prompt_token_ids=(5, 6), sampling=SamplingParams(max_tokens=30, ignore_eos=True))
        first = engine.generate(req)
        await first.__anext__()
        with pytest.raises(ValueError, match="already being served"):
            await engine.generate(req).__anext__()
        await first.aclose()

    asyncio.run(go())
    _wait_drained(engine)


def test_run_config_default_body_limit():
    assert RunConfig().server.max_body_bytes == 32 * 1024 * 1024


def test_online_client_sends_procedural_images_as_jpeg_and_keeps_encoded_bytes():
    import base64

    from epd.request import ImageInput
    from epd.serve.loadgen import data_url

    url = data_url(ImageInput(width=320, height=240, seed=3))
    assert url.startswith("data:image/jpeg;base64,") and base64.b64decode(url.split(",", 1)[1])[:2] == b"\xff\xd8"
    png = base64.b64decode(png_data_url().split(",", 1)[1])
    assert data_url(ImageInput(data=png)) == "data:image/png;base64," + base64.b64encode(png).decode()


def test_a_server_engine_keeps_only_the_requests_in_flight():
    """With retain_finished=False (how `python -m epd.serve` runs) a request's state and output go once
    its stream ends — finished, stopped by a stop string, refused, or left by its client."""
    llm = AsyncLLM(ModelConfig(), DEPLOYMENT, "local", retain_finished=False)
    live = _serve(llm)
    try:
        cli = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        for i in range(6):
            cli.chat.completions.create(model="tiny-llava", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=5, temperature=0)
        list(cli.chat.completions.create(model="tiny-llava", messages=MSG, max_tokens=5, stream=True))
        cli.chat.completions.create(model="tiny-llava", messages=MSG, max_tokens=40, stop=["a"], logit_bias={str(ord("a") + 4): 100})
        assert _post(live, "/v1/chat/completions", {"model": "tiny-llava", "messages": MSG, "max_tokens": 9000}).status_code == 400
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3000, "ignore_eos": True},
                       timeout=httpx.Timeout(60, read=0.5))  # fmt: skip
        deadline = time.time() + 10
        while (llm.core.pipeline.states or llm.core.has_work()) and time.time() < deadline:
            time.sleep(0.05)
        assert not llm.core.pipeline.states and not llm.core.pipeline.outputs
        for inst in llm.core.pipeline.instances.values():
            inst.assert_drained()  # every block free, or cached with nobody holding it
    finally:
        live.stop()
        llm.close()


def test_continuous_usage_times_tokens_whose_text_is_empty(client, engine):
    """Tokens that decode to no text still reach a client that asks for usage on every chunk: one
    chunk per engine step, the running count rising to the total (how the load generator times them)."""
    silent = {"300": 100.0}  # outside the byte range: decodes to ""
    kw = dict(max_tokens=12, logit_bias=silent, stream=True, **GREEDY)
    plain = list(client.chat.completions.create(stream_options={"include_usage": True}, **kw))
    assert not any(c.choices and c.choices[0].delta.content for c in plain)  # nothing to time without usage
    chunks = list(client.chat.completions.create(stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12 and chunks[-1].usage.prompt_tokens > 0
    steps = [c for c in chunks if c.choices and c.choices[0].finish_reason is None and c.usage.completion_tokens > 0]
    assert len({c.usage.completion_tokens for c in steps}) >= 2  # tokens arrived over several chunks, not all at the end
    assert all((c.choices[0].delta.content or "") == "" for c in steps)
    _wait_drained(engine)


def test_x_request_id_names_the_response_and_the_engine_requests(live, engine):
    """A client's X-Request-Id (as vLLM takes it) becomes the response's id and the start of the engine's
    request ids; two requests sent with one id are still two requests; a malformed id is a 400 naming it."""
    body = dict(model="tiny-llava", messages=MSG, max_tokens=3, temperature=0, n=2, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: _post(live, "/v1/chat/completions", body, headers={"X-Request-Id": "client-7.a:1"}), range(2))
    assert a.status_code == b.status_code == 200
    assert a.json()["id"] == b.json()["id"] == "chatcmpl-client-7.a:1"
    assert a.json()["choices"][1]["message"]["content"] == b.json()["choices"][1]["message"]["content"]
    _wait_drained(engine)
    ids = [rid for rid in engine.core.pipeline.outputs if rid.startswith("chatcmpl-client-7.a:1-")]
    assert len(ids) == 4 and len({rid.rsplit("-", 2)[0] for rid in ids}) == 2  # two requests of two choices
    for bad in ("", "a b", "x" * 129, "a/b"):
        r = _post(live, "/v1/chat/completions", body, headers={"X-Request-Id": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id", (bad, r.text)
    _wait_drained(engine)


def test_server_split_parts_the_client_times_into_engine_and_outside():
    from epd.lifetime import Event
    from epd.lifetime import LifetimeEvent as Ev
    from epd.metrics import timelines
    from epd.serve.loadgen import server_split

    def tl(rid, issued, first, finished, n):
        return [
            Event(issued, rid, Ev.ISSUED, None, {}),
            Event(first, rid, Ev.FIRST_TOKEN, None, {}),
            Event(finished, rid, Ev.FINISHED, None, {"num_output_tokens": n}),
        ]

    client = timelines(tl("r-1", 0.0, 0.5, 1.4, 10) + tl("r-2", 1.0, 1.3, 2.2, 10) + tl("r-3", 2.0, 2.4, 2.5, 1))
    # engine clock of its own; r-3 never reached the engine (its events were not kept), "x" is another client's
    engine = timelines(tl("chatcmpl-r-1-0a1b2c3d-0-0", 10.1, 10.4, 11.2, 10) + tl("chatcmpl-r-2-99aa88bb-0-0", 11.05, 11.25, 12.1, 10))
    engine.update(timelines(tl("chatcmpl-x-12345678-0-0", 0, 1, 2, 3)))
    split = server_split(client, engine)
    assert split["server_split_requests"] == 2
    assert split["server_engine_ttft_p50"] == pytest.approx((0.3 + 0.2) / 2)
    assert split["server_outside_ttft_p50"] == pytest.approx((0.2 + 0.1) / 2)
    assert split["server_engine_tpot_p50"] == pytest.approx((0.8 / 9 + 0.85 / 9) / 2)
    assert split["server_outside_tpot_p90"] == pytest.approx(np_percentile([0.1 / 9, 0.05 / 9], 90))
    assert "server_render_p50" not in split  # no server marks: no finer split

    # The server's marks (wall clock) with both clocks' origins: the outside part along the request's way.
    from epd.serve.timing import ServerTimings

    timings = ServerTimings()
    marks = {
        "r-1": (1000.02, 1000.03, 1000.05, 1000.06, 1000.10, 1000.45),  # engine: issued 1000.1, first token 1000.4
        "r-2": (1001.01, 1001.015, 1001.02, 1001.03, 1001.05, 1001.27),  # engine: issued 1001.05, first token 1001.25
    }
    for rid, ts in marks.items():
        for phase, t in zip(("received", "body_start", "body_end", "handler", "submitted", "first_chunk"), ts):
            timings.mark(rid, phase, t)
    timings.mark("r-1", "received", 5.0)  # a later mark (a retry) keeps the first
    split = server_split(client, engine, timings, client_start=1000.0, engine_origin=990.0)
    want = {"to_app": (0.02, 0.01), "body": (0.03, 0.01), "parse": (0.01, 0.01), "render": (0.04, 0.02), "stream": (0.05, 0.02)}
    want["wire"] = (0.05, 0.03)
    for part, (a, b) in want.items():
        assert split[f"server_{part}_p50"] == pytest.approx((a + b) / 2), part
    # the parts add up to the outside part of each request (the engine took each request as it was submitted)
    assert sum(a for a, _ in want.values()) == pytest.approx(0.2) and sum(b for _, b in want.values()) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown server phase"):
        timings.mark("r-1", "landed")


def np_percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q))
