"""`nibble serve` as a real subprocess on a free loopback port, driven by OpenAI's and Ollama's own clients
and raw httpx: responses, streaming, errors, API key, metrics, disconnects; the server's tokens equal the
library's from an empty cache however the requests are batched; and the OpenAI-shaped library methods."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import nibble

KEY = "test-key"
N_CTX = 1024
STORY = "Once upon a time, in a small village by the sea,"
CHAT = [{"role": "user", "content": "Name three colours."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nibble_serve(*args: str, timeout: float = 300):
    """A `nibble serve` subprocess; yields (its base URL, the process) once /health answers; SIGTERM at the
    end (unless it has exited), which must exit 0."""
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "nibble.cli.main", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"nibble serve exited with {proc.returncode}:\n{log.read().decode()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("nibble serve did not answer /health in time")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.seek(0)
        output = log.read().decode()
        log.close()
    assert code == 0, output


@pytest.fixture(scope="module")
def server():
    """smollm2-135m, 4 slots, an API key and an alias."""
    with nibble_serve("smollm2-135m", "--parallel", "4", "--n-ctx", str(N_CTX), "--api-key", KEY,
                      "--alias", "tiny") as (url, _):
        yield url


@pytest.fixture(scope="module")
def one_slot():
    """smollm2-135m with one slot and no queue: a second request while one runs gets 503."""
    with nibble_serve("smollm2-135m", "--parallel", "1", "--n-ctx", "256", "--max-queue", "0") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lib():
    """The same model in this process, for outputs from an empty cache."""
    with nibble.load("smollm2-135m", n_ctx=N_CTX) as m:
        yield m


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def token_texts(model, ids) -> list[str]:
    return [model.tokenizer.token_bytes(t, special=True).decode("utf-8", "replace") for t in ids]


# ---- OpenAI's client ----

def test_chat_completion(client, lib):
    r = client.chat.completions.create(model="anything", messages=CHAT, temperature=0, max_tokens=16)
    assert r.model == "tiny" and r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == lib.chat(CHAT, temperature=0, max_tokens=16).text
    assert r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_joins_to_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model="tiny", prompt=STORY, temperature=0, max_tokens=24).choices[0].text
    stop = full[10:14]
    r = client.completions.create(model="tiny", prompt=STORY, temperature=0, max_tokens=24, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seed_reproduces_a_sampled_completion(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=STORY, temperature=0.8, seed=seed,
                                         max_tokens=20).choices[0].text
    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_speculative_requests_give_the_plain_text(client, server):
    messages = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog, "
                                            "the quick brown fox jumps over the lazy dog."}]
    plain = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    spec = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30,
                                          extra_body={"speculative": "ngram", "draft_max": 8})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.model_extra["timings"]["draft_tokens"] > 0
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth(), timeout=60,
                   json={"messages": messages, "speculative": "draft"})
    assert r.status_code == 400 and "no draft model" in r.json()["error"]["message"]


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=5, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:   # greedy: each token is the likeliest
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob <= 0


def test_prompt_over_the_context_is_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 2000, max_tokens=1)
    assert e.value.status_code == 400 and str(N_CTX) in e.value.message
    assert e.value.body["code"] == "context_length_exceeded"


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.post(f"{server}/api/chat", json={}).json() == {"error": "missing or wrong API key: send "
                                                                         "'Authorization: Bearer KEY'"}
    assert httpx.get(f"{server}/health").status_code == 200


def test_models_lists_the_name_and_the_alias(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m", "tiny"]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "x", "top_p": 2}', "top_p"),
    (b'{"prompt": "x", "n": 2}', "n"),
    (b'{"prompt": "x", "logit_bias": {"abc": 1}}', "logit_bias"),
    (b'{"prompt": "x", "stop": 5}', "stop"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": ""}', "prompt"),
])
def test_bad_bodies_are_400_in_openai_shape(server, body, param):
    r = httpx.post(f"{server}/v1/completions", content=body, headers=auth())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_chat_bodies_are_400(server):
    for body in ({"messages": "hi"}, {"messages": [{"content": "no role"}]}, {"messages": CHAT, "stream": "yes"}):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth())
        assert r.status_code == 400, r.text


def test_body_over_one_mib_is_413_and_the_server_lives_on(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "' + b"a" * (1 << 20) + b'"}',
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_metrics_count_what_was_sent(client, server):
    def scrape() -> dict:
        text = httpx.get(f"{server}/metrics", headers=auth()).text
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def requests(m):
        return sum(v for k, v in m.items() if k.startswith("nibble_requests_total"))

    before = scrape()
    usages = [client.completions.create(model="tiny", prompt=STORY, temperature=0, max_tokens=n).usage
              for n in (3, 5)]
    after = scrape()
    assert requests(after) - requests(before) == 2
    assert after["nibble_generated_tokens_total[]"] - before["nibble_generated_tokens_total[]"] == \
        sum(u.completion_tokens for u in usages) == 8
    assert after["nibble_prompt_tokens_total[]"] - before["nibble_prompt_tokens_total[]"] == \
        sum(u.prompt_tokens for u in usages)
    assert after["nibble_time_to_first_token_seconds_count[]"] - \
        before["nibble_time_to_first_token_seconds_count[]"] == 2
    assert after["nibble_slots[]"] == 4 and after["nibble_slots_busy[]"] == 0
    assert after["nibble_queue_length[]"] == 0 and after["nibble_kv_cells_used[]"] > 0


# ---- one slot, no queue: 503 and disconnects ----

def wait_until_served(url: str) -> httpx.Response:
    """A short request, retried while the one slot is still busy (503) for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0}, timeout=60)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_full_server_is_503_and_a_disconnect_frees_the_slot(one_slot):
    body = {"prompt": STORY, "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{one_slot}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))   # generating
        busy = httpx.post(f"{one_slot}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["type"] == "unavailable_error"
    # the client went away mid-stream: its generation is cancelled and the slot freed
    r = wait_until_served(one_slot)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    # the same for a client that gives up waiting for a whole (non-streamed) answer
    # (greedy: this prompt runs the whole 200 tokens, about 2 s, so the answer cannot come within 0.5 s)
    try:
        r = httpx.post(f"{one_slot}/v1/completions", json={"prompt": STORY, "max_tokens": 200, "temperature": 0},
                       timeout=0.5)
    except httpx.ReadTimeout:
        pass
    else:
        pytest.fail(f"answered within 0.5 s: {r.status_code} {r.text[:300]}")
    r = wait_until_served(one_slot)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    metrics = httpx.get(f"{one_slot}/metrics").text
    assert 'nibble_requests_total{endpoint="completions",finish_reason="cancelled"} 2.0' in metrics


def test_sigint_cancels_running_streams_and_exits_0():
    with nibble_serve("smollm2-135m", "--parallel", "1", "--n-ctx", "256") as (url, proc):
        body = {"prompt": STORY, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGINT)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "cancelled"' in rest[-2]
        assert proc.wait(timeout=30) == 0


# ---- Ollama's client ----

@pytest.fixture(scope="module")
def ollama_client(server):
    return ollama.Client(host=server, headers=auth())


def test_ollama_chat(ollama_client, lib):
    r = ollama_client.chat(model="tiny", messages=CHAT, stream=False, options={"temperature": 0, "num_predict": 12})
    assert r.done and r.message.role == "assistant"
    assert r.message.content == lib.chat(CHAT, temperature=0, max_tokens=12).text
    assert r.eval_count <= 12 and r.prompt_eval_count > 0


def test_ollama_generate_streams(ollama_client):
    parts = list(ollama_client.generate(model="tiny", prompt="Why is the sky blue?", stream=True,
                                        options={"temperature": 0, "num_predict": 10, "seed": 1}))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason in ("stop", "length") and parts[-1].eval_count <= 10
    whole = ollama_client.generate(model="tiny", prompt="Why is the sky blue?", stream=False,
                                   options={"temperature": 0, "num_predict": 10})
    assert "".join(p.response for p in parts) == whole.response


def test_ollama_tags_show_version(ollama_client):
    names = [m.model for m in ollama_client.list().models]
    assert names == ["smollm2-135m", "tiny"]
    show = ollama_client.show("tiny")
    assert show.details.format == "gguf" and show.details.family == "llama"
    assert show.modelinfo["general.architecture"] == "llama"
    assert isinstance(httpx.get(ollama_client._client.base_url.join("/api/version"), headers=auth())
                      .json()["version"], str)


def test_ollama_errors_are_its_shape(server):
    r = httpx.post(f"{server}/api/generate", json={"prompt": "x", "options": {"temperature": "hot"}},
                   headers=auth())
    assert r.status_code == 400 and "temperature" in r.json()["error"]


# ---- the server's tokens are the library's, however requests are batched ----

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is",
           "In 1492,", "My favourite food is", "Water boils at", "import numpy as np\n"]


def check_batch_invariance(url, model, headers, max_tokens):
    """8 prompts with their own seeds, sampled at temperature 0.8: one by one in this process, then all at
    once through the server (they queue, join mid-stream and share steps): the same tokens."""
    alone = [model.generate(p, seed=100 + i, temperature=0.8, max_tokens=max_tokens) for i, p in enumerate(PROMPTS)]

    def ask(i):
        r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=300, json={
            "prompt": PROMPTS[i], "seed": 100 + i, "temperature": 0.8, "max_tokens": max_tokens, "logprobs": 0})
        r.raise_for_status()
        return r.json()["choices"][0]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        served = list(pool.map(ask, range(len(PROMPTS))))
    for a, s in zip(alone, served):
        assert s["text"] == a.text
        assert s["logprobs"]["tokens"] == token_texts(model, a.tokens)


def test_batched_requests_give_the_tokens_of_lone_ones(server, lib):
    check_batch_invariance(server, lib, auth(), max_tokens=16)


@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b"])
def test_batched_requests_give_the_tokens_of_lone_ones_other_models(name):
    with nibble.load(name, n_ctx=512) as model, nibble_serve(name, "--parallel", "4", "--n-ctx", "512") as (url, _):
        check_batch_invariance(url, model, {}, max_tokens=12)


def test_prompt_extended_by_a_suffix_reuses_the_cache_and_gives_the_library_tokens(client, lib):
    a = "The history of the printing press begins"
    assert len(lib.tokenize(a)) % 4 != 0
    for prompt in (a, a + " in the fifteenth century, when"):
        r = client.completions.create(model="tiny", prompt=prompt, temperature=0.8, seed=5, max_tokens=12)
        assert r.choices[0].text == lib.generate(prompt, temperature=0.8, seed=5, max_tokens=12).text
    assert r.usage.prompt_tokens_details.cached_tokens >= len(lib.tokenize(a)) - 1


def test_two_turn_chat_gives_the_library_tokens(client, lib):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    for turn in range(2):
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0.8, seed=3, max_tokens=12)
        reply = r.choices[0].message.content
        assert reply == lib.chat(messages, temperature=0.8, seed=3, max_tokens=12).text
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And another?"}]
    assert r.usage.prompt_tokens_details.cached_tokens > 0


# ---- the library ----

def test_create_chat_completion_and_its_stream(lib):
    r = lib.create_chat_completion(CHAT, temperature=0, max_tokens=12)
    assert r["object"] == "chat.completion" and r["model"] == "smollm2-135m"
    assert r["choices"][0]["message"]["content"] == lib.chat(CHAT, temperature=0, max_tokens=12).text
    usage = r["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "cached_tokens" in usage["prompt_tokens_details"]
    chunks = list(lib.create_chat_completion(CHAT, temperature=0, max_tokens=12, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        r["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    with pytest.raises(nibble.InvalidRequestError) as e:
        lib.create_chat_completion(CHAT, top_p="x")
    assert e.value.param == "top_p"


def test_create_completion(lib):
    r = lib.create_completion(STORY, temperature=0, max_tokens=8, logprobs=2)
    choice = r["choices"][0]
    assert r["object"] == "text_completion"
    assert choice["text"] == lib.generate(STORY, temperature=0, max_tokens=8).text
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    ids = lib.tokenize(STORY)
    assert lib.create_completion(ids, temperature=0, max_tokens=8)["choices"][0]["text"] == choice["text"]


def test_astream(lib):
    async def collect():
        return [piece async for piece in lib.astream(STORY, temperature=0.8, seed=2, max_tokens=10)]
    pieces = asyncio.run(collect())
    assert "".join(pieces) == lib.generate(STORY, temperature=0.8, seed=2, max_tokens=10).text


def test_one_model_from_four_threads_gives_the_single_threaded_outputs(lib):
    alone = [lib.generate(p, seed=i, max_tokens=10).text for i, p in enumerate(PROMPTS[:4])]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: lib.generate(PROMPTS[i], seed=i, max_tokens=10).text, range(4)))
    assert together == alone


def test_two_models_side_by_side(lib):
    with nibble.load("gemma3-270m", n_ctx=256) as gemma:
        alone = [lib.generate(STORY, seed=1, max_tokens=8).text, gemma.generate(STORY, seed=1, max_tokens=8).text]
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda m: m.generate(STORY, seed=1, max_tokens=8).text, [lib, gemma]))
    assert together == alone


def test_with_closes_the_model():
    with nibble.load("smollm2-135m", n_ctx=128) as m:
        assert m.generate("Hi", max_tokens=2, temperature=0).usage.completion_tokens == 2
    with pytest.raises(nibble.NibbleError, match="closed"):
        m.generate("Hi", max_tokens=2)


# ---- the command ----

def test_non_loopback_host_needs_an_api_key(cli):
    r = cli("serve", "smollm2-135m", "--host", "0.0.0.0")
    assert r.returncode == 2 and "--api-key" in r.stderr
