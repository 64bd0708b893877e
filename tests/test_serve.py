"""``ssmkit serve``: a real server process on localhost, driven by the official ``openai`` client and raw
HTTP (httpx).

The reference for every generated text is the model itself, in this process: ``model.generate`` on the
same prompt ids (greedy, or with a ``torch.Generator`` seeded as the request's ``seed``), decoded with the
folder's tokenizer and cut at the end-of-sequence token. The model is a tiny random MambaLM (weights
perturbed away from their initialisation) with a ``tokenizers`` tokenizer.json of 96 characters, ``<unk>``
and seven special tokens, and a chat template in tokenizer_config.json.

Two servers per module: ``server`` (defaults, with the chat template) and ``limited`` (no chat template,
--max-batch 1, --max-streams 2, --max-prompt-tokens 8), which the last test stops with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ssmkit import MambaConfig, MambaLM  # noqa: E402
from ssmkit.data.tokenizer import load_tokenizer  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TIMEOUT = 20.0  # seconds, for any one request or wait
STARTUP_TIMEOUT = 240.0  # a server's start, which may include the first build of the C++ kernels


def make_model_folder(folder: Path, chat_template: str | None) -> None:
    from tokenizers import Tokenizer, decoders, models

    folder.mkdir(parents=True)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    # 104 tokens, a multiple of 8: the model has no padded vocabulary rows (which a Hugging Face
    # config.json counts in vocab_size, and generate would sample from)
    tok.add_special_tokens(
        ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|developer|>", "<|tool|>", "<pad>"]
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|end|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    assert vocab_size == 104
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)


class Server:
    """A ``python -m ssmkit serve`` process; its port is read from the line it prints."""

    def __init__(self, folder: Path, *flags: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssmkit", "serve", str(folder), "--port", "0", "--threads", "1", *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._first_line()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, f"no address in {line!r}; stderr: {self.proc.stderr.read() if self.proc.poll() else ''}"
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)

    def _first_line(self) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(STARTUP_TIMEOUT)
        assert box, f"the server printed nothing within {STARTUP_TIMEOUT} s"
        return box[0]

    def health(self) -> dict:
        return self.http.get("/health").json()

    def wait_for(self, predicate, what: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            h = self.health()
            if predicate(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; /health: {self.health()}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.http.close()
        return self.proc.returncode, err


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process reference on one thread: the machine is shared with the servers (and others)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-mamba"
    make_model_folder(path, TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def limited(folder):
    plain = folder.parent / "no-template"
    shutil.copytree(folder, plain)
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    s = Server(plain, "--max-batch", "1", "--max-streams", "2", "--max-prompt-tokens", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(folder):
    """(model, tokenizer) loaded in this process: the expected outputs."""
    return MambaLM.from_pretrained(folder).eval(), load_tokenizer(folder)


@pytest.fixture(scope="module")
def endless(reference) -> str:
    """A prompt whose greedy continuation runs long without the end-of-sequence token."""
    assert expected(reference, reference[1].encode("forever"), 150)[1] == "length"
    return "forever"


def expected(reference, prompt_ids: list[int], max_tokens: int, seed: int | None = None) -> tuple[str, str]:
    """(text, finish_reason) that generating alone gives: greedy, or sampled with ``seed``."""
    model, tok = reference
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_tokens,
        temperature=0.0 if seed is None else 1.0,
        eos_token_id=tok.eos_token_id,
        generator=generator,
    )[0, len(prompt_ids) :].tolist()
    if tok.eos_token_id in out:
        return tok.decode(out[: out.index(tok.eos_token_id)]), "stop"
    return tok.decode(out), "length"


def stream_text(server: Server, **request) -> tuple[str, str | None, list]:
    """(joined text, last finish_reason, chunks) of a streamed completion through the openai client."""
    chunks = list(server.client.completions.create(model="tiny-mamba", stream=True, **request))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, (reasons[-1] if reasons else None), chunks


# ---------------------------------------------------------------------- the API


def test_models_and_health(server, reference):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny-mamba"]
    health = server.health()
    assert health["status"] == "ok"
    assert health["state_bytes_per_stream"] == reference[0].new_cache(1).nbytes == 2 * 128 * (4 + 16) * 4


@pytest.mark.parametrize("prompt", ["Hello", "The state space model", "x"])
def test_completion_matches_generate(server, reference, prompt):
    ids = reference[1].encode(prompt)
    text, finish = expected(reference, ids, 24)
    out = server.client.completions.create(model="tiny-mamba", prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == text
    assert out.choices[0].finish_reason == finish
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens <= 24
    # token ids as the prompt give the same answer
    by_ids = server.client.completions.create(model="tiny-mamba", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == text


def test_chat_uses_the_template(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = "<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>"  # the template, by hand
    ids = reference[1].encode(prompt)
    text, finish = expected(reference, ids, 20)
    out = server.client.chat.completions.create(
        model="tiny-mamba", messages=messages, max_tokens=20, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == finish
    assert out.usage.prompt_tokens == len(ids)

    chunks = list(
        server.client.chat.completions.create(
            model="tiny-mamba", messages=messages, max_tokens=20, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_streaming_equals_json_with_usage(server, reference):
    ids = reference[1].encode("Stream me")
    text, finish = expected(reference, ids, 30)
    streamed, reason, chunks = stream_text(
        server, prompt="Stream me", max_tokens=30, temperature=0, stream_options={"include_usage": True}
    )
    assert streamed == text and reason == finish
    assert len(chunks) > 2  # text arrived in pieces
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    raw = server.http.post(
        "/v1/completions",
        json={
            "model": "tiny-mamba",
            "prompt": "Stream me",
            "max_tokens": 30,
            "temperature": 0,
            "stream": True,
        },
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings(server, reference):
    ids = reference[1].encode("Hello")
    full, _ = expected(reference, ids, 40)
    stop = full[10:13]
    cut = full[: full.index(stop)]
    out = server.client.completions.create(
        model="tiny-mamba", prompt="Hello", max_tokens=40, temperature=0, stop=stop
    )
    assert out.choices[0].text == cut
    assert out.choices[0].finish_reason == "stop"
    streamed, reason, _ = stream_text(
        server, prompt="Hello", max_tokens=40, temperature=0, stop=["#never#", stop]
    )
    assert streamed == cut and reason == "stop"
    # a stop string that never occurs changes nothing
    out = server.client.completions.create(
        model="tiny-mamba", prompt="Hello", max_tokens=40, temperature=0, stop="\x01"
    )
    assert out.choices[0].text == full


def test_seed_reproduces_the_text_whatever_the_batch(server, reference, endless):
    ids = reference[1].encode("Seeded")
    text, _ = expected(reference, ids, 24, seed=1234)
    request = dict(model="tiny-mamba", prompt="Seeded", max_tokens=24, temperature=1.0, seed=1234)
    assert server.client.completions.create(**request).choices[0].text == text
    # again, while three other (greedy, endless) streams share the decode batch
    busy = {"model": "tiny-mamba", "prompt": endless, "max_tokens": 10**9, "stream": True, "temperature": 0}
    with contextlib.ExitStack() as stack:
        lines = []  # held: a dropped line iterator closes its response
        for _ in range(3):
            lines.append(
                stack.enter_context(server.http.stream("POST", "/v1/completions", json=busy)).iter_lines()
            )
            assert next(line for line in lines[-1] if line).startswith("data: ")
        server.wait_for(lambda h: h["active"] == 3, "the other streams to decode")
        assert server.client.completions.create(**request).choices[0].text == text
        assert server.health()["active"] == 3
    server.wait_for(lambda h: h["streams"] == 0, "the other streams to be dropped")
    other_seed = server.client.completions.create(**{**request, "seed": 99}).choices[0].text
    assert other_seed == expected(reference, ids, 24, seed=99)[0] != text


def test_concurrent_streams_give_each_its_own_tokens(server, reference):
    """Streams that join and leave the running batch at different times: each gets exactly the tokens it
    gets alone (greedy), and the batch really held several at once."""
    prompts = ["a", "Mamba state", "bb bb bb", "Long prompt " * 20, "?", "Zz", "selective scan", "0123"]
    lengths = [120, 75, 180, 90, 150, 30, 135, 105]
    want = [expected(reference, reference[1].encode(p), n) for p, n in zip(prompts, lengths)]
    got: dict[int, tuple[str, str | None]] = {}
    before = server.health()

    def run(i):
        time.sleep(0.01 * (i % 4))  # arrive while others are decoding
        text, reason, _ = stream_text(server, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
        got[i] = (text, reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert [got.get(i) for i in range(len(prompts))] == want
    health = server.wait_for(lambda h: h["streams"] == 0, "all streams to end")
    assert health["state_bytes"] == 0
    tokens = health["tokens_generated"] - before["tokens_generated"]
    steps = health["decode_steps"] - before["decode_steps"]
    assert steps < 0.75 * tokens, (steps, tokens)  # one step served several streams


def test_disconnect_frees_the_slot(server, endless):
    before = server.health()["tokens_generated"]
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        request = {"model": "tiny-mamba", "prompt": endless, "max_tokens": 10**9, "stream": True}
        with c.stream("POST", "/v1/completions", json={**request, "temperature": 0}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
            live = server.wait_for(lambda h: h["active"] == 1, "the stream to decode")
            assert live["streams"] == 1 and live["state_bytes"] == live["state_bytes_per_stream"]
    # the client is gone: the stream leaves the batch and its state is freed
    health = server.wait_for(lambda h: h["streams"] == 0, "the disconnected stream to be dropped")
    assert health["state_bytes"] == 0
    assert health["tokens_generated"] - before < 10**5

    # a non-streaming request whose client gives up is dropped too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json={"model": "tiny-mamba", "prompt": endless, "max_tokens": 10**9, "temperature": 0},
            timeout=0.5,
        )
    server.wait_for(lambda h: h["streams"] == 0, "the abandoned request to be dropped")


# ---------------------------------------------------------------------- errors


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


GOOD = {"model": "tiny-mamba", "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, None),
        (b"[1, 2]", 400, None, None),
        ({**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"prompt": "hi"}, 400, "model", "missing_required_parameter"),
        ({**GOOD, "temperature": -1}, 400, "temperature", "invalid_value"),
        ({**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
        ({**GOOD, "top_k": -3}, 400, "top_k", "invalid_value"),
        ({**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({**GOOD, "n": 2}, 400, "n", "invalid_value"),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
        ({**GOOD, "stop": ""}, 400, "stop", "invalid_value"),
        ({**GOOD, "logprobs": 3}, 400, "logprobs", "unsupported"),
        ({**GOOD, "frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported"),
        ({**GOOD, "temprature": 0.5}, 400, "temprature", "unknown_parameter"),
        ({**GOOD, "prompt": ""}, 400, "prompt", None),
        ({**GOOD, "prompt": [5, 100000]}, 400, "prompt", None),
        ({**GOOD, "prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
        ({**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    if isinstance(body, bytes):
        r = server.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = server.http.post("/v1/completions", json=body)
    assert r.status_code == status
    error = error_of(r)
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


def test_bad_chat_requests(server):
    r = server.http.post("/v1/chat/completions", json={"model": "tiny-mamba", "messages": []})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = server.http.post(
        "/v1/chat/completions", json={"model": "tiny-mamba", "messages": [{"role": "wizard", "content": "x"}]}
    )
    assert r.status_code == 400 and error_of(r)["param"] == "messages[0]"
    r = server.http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny-mamba", prompt="hi", temperature=5)


def test_no_chat_template_is_a_clear_400(limited):
    r = limited.http.post(
        "/v1/chat/completions", json={"model": "no-template", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 400
    error = error_of(r)
    assert error["code"] == "no_chat_template" and "chat template" in error["message"]
    # completions still work
    out = limited.client.completions.create(model="no-template", prompt="hi", max_tokens=3)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_max_prompt_tokens(limited):
    ok = limited.http.post(
        "/v1/completions", json={"model": "no-template", "prompt": "8 tokens", "max_tokens": 1}
    )
    assert ok.status_code == 200
    r = limited.http.post(
        "/v1/completions", json={"model": "no-template", "prompt": "9 tokens!", "max_tokens": 1}
    )
    assert r.status_code == 400
    error = error_of(r)
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert "9 tokens" in error["message"] and "8" in error["message"]


def test_max_streams_then_sigterm_shuts_down_cleanly(limited, endless):
    """--max-batch 1: the second stream waits; --max-streams 2: the third is refused (503). Then SIGTERM
    with both streams open: they end, and the process exits at once without a traceback."""
    endings: list[str] = []

    def long_stream():
        request = {
            "model": "no-template",
            "prompt": endless,
            "max_tokens": 10**9,
            "stream": True,
            "temperature": 0,
        }
        try:
            with httpx.stream("POST", limited.url + "/v1/completions", json=request, timeout=TIMEOUT) as r:
                last = [line for line in r.iter_lines() if line][-1]
                endings.append(last)
        except httpx.HTTPError as err:  # the connection closing is an acceptable end too
            endings.append(type(err).__name__)

    threads = [threading.Thread(target=long_stream) for _ in range(2)]
    for t in threads:
        t.start()
    health = limited.wait_for(lambda h: h["streams"] == 2, "two live streams")
    assert health["active"] <= 1  # one decodes; the other waits for the batch slot
    r = limited.http.post("/v1/completions", json={"model": "no-template", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r)["type"] == "server_error"

    start = time.monotonic()
    code, stderr = limited.stop()
    for t in threads:
        t.join(TIMEOUT)
    assert time.monotonic() - start < 10
    assert code in (0, -signal.SIGTERM), stderr
    assert "Traceback" not in stderr, stderr
    assert len(endings) == 2
    assert all(e == "data: [DONE]" or e.startswith('data: {"error"') or e.endswith("Error") for e in endings)


def test_transformer_folder_is_refused(tmp_path):
    from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM

    folder = tmp_path / "tf"
    TransformerLM(TransformerConfig(d_model=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(folder)
    r = subprocess.run(
        [sys.executable, "-m", "ssmkit", "serve", str(folder), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "KV cache grows" in r.stderr and "Mamba" in r.stderr


# ---------------------------------------------------------------------- text pieces (no server)


def test_incremental_decoder_waits_for_whole_characters():
    from ssmkit.data.tokenizer import ByteTokenizer
    from ssmkit.serve.text import IncrementalDecoder

    text = "añb€c😀d"
    decoder = IncrementalDecoder(ByteTokenizer())
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["a", "", "ñ"]  # ñ is two bytes: nothing after the first
    assert len(decoder._ids) <= 5  # the window, not the whole text


def test_stop_matcher_holds_back_possible_starts_only():
    from ssmkit.serve.text import StopMatcher

    m = StopMatcher(("END", "xy"))
    assert m.push("abcE") == ("abc", False)  # "E" may start "END"
    assert m.push("Nd") == ("ENd", False)  # it did not
    assert m.push("x") == ("", False)
    assert m.push("yz") == ("", True)  # "xy" completed: nothing of it is returned
    m = StopMatcher(("END",))
    assert m.push("aEN") == ("a", False)
    assert m.push("", final=True) == ("EN", False)
    assert StopMatcher().push("anything") == ("anything", False)


def test_cli_checks_flags_before_loading(tmp_path, capsys):
    from ssmkit.cli import main

    assert main(["serve", str(tmp_path), "--max-batch", "8", "--max-streams", "4"]) == 1
    assert capsys.readouterr().err == "error: --max-streams (4) must be >= --max-batch (8)\n"
    assert main(["serve", str(tmp_path / "missing")]) == 1
    assert "MODEL_DIR" in capsys.readouterr().err


def test_mamba2_and_falcon_folders_load_and_a_hybrid_is_refused(tmp_path):
    """Every constant-state family is served; a hybrid's attention KV caches could not join a batch."""
    from ssmkit import Mamba2Config
    from ssmkit.serve.server import ServeConfig, load

    for name, cfg in {
        "m2": Mamba2Config(d_model=32, n_layer=1, vocab_size=104, d_state=8, headdim=16),
        "falcon": MambaConfig(d_model=32, n_layer=1, vocab_size=104, mixer_rms_eps=1e-6),
    }.items():
        make_model_folder(tmp_path / name, None)
        MambaLM(cfg).save_pretrained(tmp_path / name)
        model, *_ = load(ServeConfig(model_dir=tmp_path / name))
        assert type(model.config) is type(cfg)
    hybrid = MambaConfig(d_model=32, n_layer=2, vocab_size=104, attn_layer_idx=[1],
                         attn_cfg={"num_heads": 2, "causal": True})  # fmt: skip
    make_model_folder(tmp_path / "hybrid", None)
    MambaLM(hybrid).save_pretrained(tmp_path / "hybrid", format="mamba-ssm")
    for p in (tmp_path / "hybrid").glob("model.safetensors"):
        p.unlink()
    with pytest.raises(ValueError, match=r"a hybrid with attention layers \[1\] is not served"):
        load(ServeConfig(model_dir=tmp_path / "hybrid"))
