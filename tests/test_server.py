"""The OpenAI-compatible server: a live uvicorn server on loopback over the real engine (Ray, EPD),
driven by the official `openai` client and raw HTTP for the bad cases."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from epd.config import RunConfig
from epd.request import Request, SamplingParams
from tests.serving import _serve, _wait_drained, png_data_url


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 40), (0, 90, 0)).save(root / "green.png")
    live = _serve(engine, image_root=str(root), max_images_per_request=3, max_image_bytes=200_000)
    live.root = root
    yield live
    live.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_plain_completion_with_an_image(client, engine):
    msg = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": png_data_url()}}],
        }
    ]
    out = client.chat.completions.create(model="tiny-llava", messages=msg, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens > 16  # the image's 16 placeholder tokens and the text
    # the same prompt straight into the engine gives the text the server answered
    from epd.serve.app import render_chat
    from epd.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest(messages=msg)
    [(ids, images, _)] = render_chat(body, RunConfig(), engine.core.pipeline.tokenizer)
    req = Request("direct", prompt_token_ids=tuple(ids), images=images, sampling=SamplingParams(max_tokens=7, ignore_eos=True))

    async def direct():
        return [t for d in [d async for d in engine.generate(req)] for t in d.token_ids]

    tokens = asyncio.run(direct())
    assert out.choices[0].message.content == engine.core.pipeline.tokenizer.decode(tokens)
    assert len(ids) + 1 + 16 == out.usage.prompt_tokens  # BOS, the image's placeholders, the text
    _wait_drained(engine)


def test_streaming_matches_the_plain_answer(client):
    msg = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": png_data_url(color=(1, 2, 3))}}, {"type": "text", "text": "hi"}],
        }
    ]
    kw = dict(model="tiny-llava", messages=msg, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_several_images_local_file_and_sampling_seed(client, server):
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url()}},
                {"type": "image_url", "image_url": {"url": "green.png"}},
                {"type": "image_url", "image_url": {"url": png_data_url(color=(9, 9, 9))}},
                {"type": "text", "text": "compare"},
            ],
        }
    ]
    a = client.chat.completions.create(
        model="tiny-llava", messages=msg, max_tokens=8, temperature=0.9, seed=5, extra_body={"ignore_eos": True}
    )
    b = client.chat.completions.create(
        model="tiny-llava", messages=msg, max_tokens=8, temperature=0.9, seed=5, extra_body={"ignore_eos": True}
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens > 3 * 16


def test_concurrent_requests(client, engine):
    def one(i):
        msg = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"request {i}"},
                    {"type": "image_url", "image_url": {"url": png_data_url(color=(i, 0, 0))}},
                ],
            }
        ]
        return client.chat.completions.create(
            model="tiny-llava", messages=msg, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, range(8)))
    assert all(o.usage.completion_tokens == 6 for o in outs)
    _wait_drained(engine)


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "epd_queue_length",
        "epd_kv_block_usage",
        "epd_mm_block_usage",
        "epd_ttft_seconds_bucket",
        "epd_tpot_seconds_bucket",
        'epd_requests_total{outcome="finished"}',
    ):
        assert name in text, name
    assert "openapi" in httpx.get(server.url + "/openapi.json").json()


BAD = [
    ("malformed JSON", b'{"messages": [', "malformed JSON"),
    ("wrong type", {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "max_tokens"),
    ("no messages", {"messages": []}, "messages"),
    ("unsupported part", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input_audio"),
    (
        "undecodable image",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
        "unreadable",
    ),
    (
        "not base64",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
        "base64",
    ),
    (
        "oversized image",
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400_000}}]}
            ]
        },
        "limit",
    ),
    (
        "too many images",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}] * 4}]},
        "at most 3",
    ),
    (
        "path outside root",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
        "outside",
    ),
    (
        "path with a null byte",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a\x00b.png"}}]}]},
        "null byte",
    ),
    (
        "path too long",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "d/" * 3000 + "a.png"}}]}]},
        "image",
    ),
    (
        "remote url",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]},
        "remote",
    ),
    ("beyond context", {"messages": [{"role": "user", "content": "x" * 5000}]}, "context"),
    ("bad temperature", {"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ("bad top_p", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ("n > 16", {"messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
]


@pytest.mark.parametrize("name,body,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_problem(server, engine, name, body, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    resp = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving
    _wait_drained(engine)


def test_api_key(engine):
    live = _serve(engine, api_key="sekrit")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(live.url + "/v1/chat/completions", json=body).status_code == 401
        bad = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=live.url + "/v1", api_key="sekrit").chat.completions.create(model="tiny-llava", **body)
        assert ok.usage.completion_tokens >= 1
    finally:
        live.stop()


def test_overload_answers_429_with_retry_after_and_recovers(engine):
    live = _serve(engine, max_concurrent_requests=2)
    try:
        body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 60, "ignore_eos": True, "temperature": 0}
        with ThreadPoolExecutor(8) as pool:
            resps = list(pool.map(lambda _: httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60), range(8)))
        codes = sorted(r.status_code for r in resps)
        assert codes.count(200) >= 2 and 429 in codes
        assert all(r.headers.get("retry-after") == "1" for r in resps if r.status_code == 429)
        _wait_drained(engine)
        assert httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        live.stop()


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server, engine):
    body = {"messages": [{"role": "user", "content": "stream a lot"}], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    _wait_drained(engine)
    assert engine.core.pipeline.outputs and any(o.abort_reason == "cancelled by the client" for o in engine.core.pipeline.outputs.values())


def test_fuzz_openapi_schema_finds_no_5xx(server):
    """Schemathesis cases from the served OpenAPI schema, bounded, loopback only: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []

    def fuzz(operation):
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            resp = case.call(base_url=server.url, timeout=30)
            if resp.status_code >= 500:
                failures.append((operation.label, resp.status_code, resp.text[:200]))

        check()

    for op in schema.get_all_operations():
        fuzz(op.ok())
    assert not failures, failures[:3]


def test_stop_string_ends_the_answer_early(client, engine):
    msg = [{"role": "user", "content": "say something"}]
    full = client.chat.completions.create(model="tiny-llava", messages=msg, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    assert len(text) > 4
    stop = text[2:4]
    cut = client.chat.completions.create(
        model="tiny-llava", messages=msg, max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].finish_reason == "stop"
    content = cut.choices[0].message.content
    # cut where the stop string first appears (the random model emits arbitrary bytes: compare loosely)
    assert stop not in content and len(content) < len(text) and text.startswith(content.rstrip("\ufffd")[:2])
    _wait_drained(engine)


def test_online_benchmark_writes_a_record(tmp_path):
    """The workload over HTTP, scored from the client's side; a server that refuses (one request at a
    time here) is retried after Retry-After when asked, and otherwise the refusals are recorded as such."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}

    def run(name: str, *extra: str) -> tuple[dict, list[dict]]:
        # one aggregated worker: what is tested is the client's side, and each worker process costs seconds to start
        args = [
            "+experiment=online_tiny",
            "deployment=aggregated",
            "workload.num_requests=5",
            "logger=none",
            f"hydra.run.dir={tmp_path}/{name}",
            *extra,
        ]
        proc = subprocess.run([sys.executable, "-m", "epd.run", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        return summary, [json.loads(line) for line in (tmp_path / name / "events.jsonl").read_text().splitlines()]

    summary, events = run("retried", "workload.rate=200", "server.max_concurrent_requests=1", "server.client_retries=30")
    assert summary["backend"] == "online" and summary["num_finished"] == 5 and summary["ttft_p50"] > 0 and summary["tpot_p50"] > 0
    assert {"issued", "first_token", "token", "finished"} <= {e["kind"] for e in events}
    for done in (e for e in events if e["kind"] == "finished"):  # every generated token timed by the client
        timed = [e for e in events if e["request_id"] == done["request_id"] and e["kind"] in ("first_token", "token")]
        assert len(timed) == done["data"]["num_output_tokens"] > 0
    assert summary["engine_startup_s"] > 0 and summary["engine_start_workers_built_s"] > 0
    # the client's TTFT split by X-Request-Id into the engine's part and the rest (retries waited count outside)
    assert summary["server_split_requests"] == 5 and 0 < summary["server_engine_ttft_p50"] <= summary["ttft_p90"]
    assert summary["server_outside_ttft_p50"] > 0
    # ... and the outside part along the request's way, from the server's marks
    for part in ("to_app", "body", "parse", "render", "stream", "wire"):
        assert summary[f"server_{part}_p50"] >= 0, part
    summary, events = run("refused", "workload.rate=200", "server.max_concurrent_requests=1")
    refused = [e for e in events if e["kind"] == "aborted"]
    assert refused and all("refused: HTTP 429" in e["data"]["reason"] for e in refused)
    assert summary["num_finished"] + summary["num_aborted"] == 5 and summary["num_finished"] >= 1


def test_answer_tokens_through_the_api(client, engine):
    """The benchmark extension: the answer ends with EOS at the asked length (the schedulers do not know it)."""
    msg = [{"role": "user", "content": "Tell me more."}]
    for n in (1, 6):
        out = client.chat.completions.create(
            model="tiny-llava", messages=msg, max_tokens=30, temperature=0, extra_body={"answer_tokens": n}
        )
        assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == n
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llava", messages=msg, max_tokens=5, extra_body={"answer_tokens": 0})
    _wait_drained(engine)
