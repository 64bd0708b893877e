"""The decode engine: one thread owns the model and decodes every live stream in one batch.

Continuous batching over ssmkit's one state protocol (``ssmkit.models.cache``). Each iteration of the
engine's loop:

    1. admit: take the streams submitted since the last iteration (``submit``, from any thread);
    2. retire the streams that were cancelled (a client went away): ``cache.select(rows kept)`` drops
       their state at once;
    3. prefill: while the decode batch has room (``max_batch``), feed the oldest waiting stream's prompt
       through ``model(ids, cache=its own cache)`` — at most ``PREFILL_CHUNK`` tokens per iteration, so a
       long prompt neither stalls the running streams for long nor allocates activations for its whole
       length — and once its prompt is consumed, sample its first token and ``Cache.cat`` its cache onto
       the running batch (SSM states do not depend on the position, so streams at different positions
       batch freely);
    4. decode: one step for the whole batch — ``ssmkit.engine.decode_step`` (the fused C++ step, which
       reads every weight once per step whatever b; a module-path step would read them once per row),
       else ``model(last tokens (b, 1), cache=cache)`` where it does not apply — then each row
       samples its own next token with its own ``torch.Generator`` (a seed reproduces a stream whatever
       else is in the batch), through ``ssmkit.generate.sample_next``;
    5. dispatch each row's new text to its stream; rows that finished (end-of-sequence token, stop string,
       ``max_tokens``) leave the batch in the same ``select``.

A stream holds its state (``cache.nbytes / b``: constant in the context length for a Mamba model), its
unconsumed prompt while it waits, and a few ids of detokenization window — nothing that grows with the
tokens it has generated. Results go back through the ``deliver`` callback given to ``submit``, called on
the engine thread with one :class:`Event` per step.

Glossary: b the decode batch (streams decoding together); stream — one request's generation.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ssmkit.data.tokenizer import Tokenizer
from ssmkit.engine import decode_step
from ssmkit.generate import sample_next
from ssmkit.models.cache import Cache
from ssmkit.serve.text import IncrementalDecoder, StopMatcher

PREFILL_CHUNK = 256
"""Prompt tokens prefilled per engine iteration (between two decode steps of the running batch)."""


class EngineFull(Exception):
    """``max_streams`` streams are already live (the server answers 503)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new streams."""


@dataclass(frozen=True)
class SamplingParams:
    """How one stream samples and when it stops (OpenAI's request fields)."""

    max_tokens: int
    """Most tokens to generate (finish_reason "length" when reached)."""
    temperature: float = 1.0
    """0 = greedy argmax."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    stop: tuple[str, ...] = ()
    """Stop strings (finish_reason "stop"; not returned)."""
    seed: int | None = None
    """Seed of the stream's generator; None = a fresh random seed."""


@dataclass
class Event:
    """What a stream produced in one engine step."""

    text: str = ""
    """New text (may be "" while a character or a possible stop string is held back)."""
    finish_reason: str | None = None
    """None while running; "stop" (EOS or a stop string) or "length" at the end."""
    error: str | None = None
    """Set (and the stream ended) when the engine failed or shut down."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Stream:
    """One request inside the engine (created by :meth:`Engine.submit`)."""

    id: int
    prompt: list[int] | None
    params: SamplingParams
    deliver: Callable[[Event], None]
    generator: torch.Generator
    decoder: IncrementalDecoder
    stops: StopMatcher
    prompt_tokens: int = 0
    prefilled: int = 0
    completion_tokens: int = 0
    last_token: int = 0
    cache: Cache | None = None  # its own cache while prefilling; None once in the batch
    cancelled: bool = False
    done: bool = False


class Engine:
    """Continuous-batching decoder over a model that speaks the state protocol.

    Args:
        model: ``new_cache(b)``, ``model(ids, cache=, num_last_tokens=)``, ``config.vocab_size``.
        tokenizer: ``decode`` for the text, ``eos_token_id`` to stop at.
        max_batch: most streams decoded together (more wait, in arrival order).
        max_streams: most live streams (decoding + waiting); ``submit`` raises EngineFull beyond.
        vocab_size: ids sampled from [0, vocab_size) (the tokenizer's and the model's common range).
    """

    def __init__(self, model, tokenizer: Tokenizer, max_batch: int, max_streams: int, vocab_size: int):
        if max_batch < 1 or max_streams < 1:
            raise ValueError(f"max_batch and max_streams must be >= 1, got {max_batch}, {max_streams}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_streams = max_streams
        self.vocab_size = vocab_size
        self.state_bytes_per_stream = model.new_cache(1).nbytes
        self._inbox: queue.SimpleQueue[Stream | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0  # streams submitted and not yet ended (guarded by _lock)
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssmkit-serve-engine", daemon=True)
        self._stats = {
            "streams": 0,
            "active": 0,
            "waiting": 0,
            "state_bytes": 0,
            "tokens_generated": 0,
            "decode_steps": 0,
        }

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Warm the model up (the first calls load, or build, the compiled kernels), then start the thread."""
        with torch.inference_mode():
            cache = self.model.new_cache(1)
            self.model(torch.zeros(1, 2, dtype=torch.long), cache=cache, num_last_tokens=1)  # prefill
            token = torch.zeros(1, 1, dtype=torch.long)  # (1, 1)
            if decode_step(self.model, token, cache) is None:  # builds / loads the fused kernel
                self.model(token, cache=cache)
        self.state_bytes_per_stream = cache.nbytes  # as decoding holds it (the fused step keeps it float32)
        self._thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, deliver: Callable[[Event], None]) -> Stream:
        """Queue a stream for ``prompt`` (non-empty ids in range); ``deliver`` gets its events."""
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        generator = torch.Generator()
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        stream = Stream(
            id=next(self._ids),
            prompt=list(prompt),
            params=params,
            deliver=deliver,
            generator=generator,
            decoder=IncrementalDecoder(self.tokenizer),
            stops=StopMatcher(params.stop),
            prompt_tokens=len(prompt),
        )
        with self._lock:  # queued before a shutdown begins, or refused: none is left behind
            if self._stopping.is_set():
                raise EngineStopped("the server is shutting down")
            if self._live >= self.max_streams:
                raise EngineFull(f"the server is at its limit of {self.max_streams} concurrent streams")
            self._live += 1
            self._inbox.put(stream)
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop ``stream`` (its client went away); its slot and state are freed at the next step."""
        if not stream.done:
            stream.cancelled = True
            self._inbox.put(None)  # wake the loop if it waits for work

    def stats(self) -> dict:
        """Live streams (``streams``; ``active`` decoding, ``waiting`` for a batch slot or their prefill),
        the bytes of state they hold, and counters since start: tokens generated and batched decode steps
        (tokens / steps > 1: streams were decoded together). Refreshed after every engine step."""
        return {
            **self._stats,  # one snapshot: streams and state bytes from the same moment
            "state_bytes_per_stream": self.state_bytes_per_stream,
            "max_batch": self.max_batch,
            "max_streams": self.max_streams,
        }

    def shutdown(self, timeout: float = 10.0) -> None:
        """End every stream (an error event), stop the thread and wait for it."""
        with self._lock:
            self._stopping.set()
        self._inbox.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        waiting: deque[Stream] = deque()
        active: list[Stream] = []
        cache: Cache | None = None
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._take_inbox(waiting, block=not active and not waiting)
                    cache = self._step(waiting, active, cache)
                    time.sleep(0)  # let the HTTP thread take the GIL and send what this step produced
                except Exception:  # a bug: end the streams it hit, keep serving the next ones
                    traceback.print_exc(file=sys.stderr)
                    for s in [*active, *waiting]:
                        self._end(s, Event(error="internal error in the decode engine (see the server log)"))
                    active.clear()
                    waiting.clear()
                    cache = None
                with self._lock:
                    live = self._live
                self._stats = {
                    "streams": live,
                    "active": len(active),
                    "waiting": len(waiting),
                    "state_bytes": (cache.nbytes if cache is not None else 0)
                    + sum(s.cache.nbytes for s in waiting if s.cache is not None),
                    "tokens_generated": self._stats["tokens_generated"],
                    "decode_steps": self._stats["decode_steps"],
                }
        self._take_inbox(waiting, block=False)
        for s in [*active, *waiting]:
            self._end(s, Event(error="the server is shutting down"))

    def _take_inbox(self, waiting: deque[Stream], block: bool) -> None:
        try:
            item = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _step(self, waiting: deque[Stream], active: list[Stream], cache: Cache | None) -> Cache | None:
        """One iteration: retire cancelled, prefill (bounded), one batched decode step. Returns the cache."""
        for s in [s for s in waiting if s.cancelled]:
            waiting.remove(s)
            self._end(s, None)
        cache = self._retire(active, cache, [i for i, s in enumerate(active) if not s.cancelled])

        joining: list[Stream] = []
        budget = PREFILL_CHUNK
        while waiting and budget > 0 and len(active) + len(joining) < self.max_batch:
            s = waiting[0]
            if s.cache is None:
                s.cache = self.model.new_cache(1)
            chunk = s.prompt[s.prefilled : s.prefilled + budget]
            ids = torch.tensor([chunk], dtype=torch.long)  # (1, l)
            logits = self.model(ids, cache=s.cache, num_last_tokens=1)[:, -1, : self.vocab_size]  # (1, v)
            s.prefilled += len(chunk)
            budget -= len(chunk)
            if s.prefilled < len(s.prompt):
                continue
            waiting.popleft()
            s.prompt = None  # consumed: the state holds it now
            (token,) = self._sample(logits, [s])
            if not self._accept(s, token):
                joining.append(s)
        if joining:
            active.extend(joining)  # first, so that a failure below still ends them
            cache = Cache.cat(([cache] if cache is not None else []) + [s.cache for s in joining])
            for s in joining:
                s.cache = None

        if not active or cache is None:
            return cache
        tokens = torch.tensor([[s.last_token] for s in active], dtype=torch.long)  # (b, 1)
        logits = decode_step(self.model, tokens, cache)  # (b, 1, V_pad), None where it does not apply
        if logits is None:
            logits = self.model(tokens, cache=cache)  # (b, 1, V_pad)
        logits = logits[:, -1, : self.vocab_size]  # (b, v)
        self._stats["decode_steps"] += 1
        keep = [
            i for i, (s, t) in enumerate(zip(active, self._sample(logits, active))) if not self._accept(s, t)
        ]
        return self._retire(active, cache, keep)

    def _retire(self, active: list[Stream], cache: Cache | None, keep: list[int]) -> Cache | None:
        """Keep only the rows ``keep`` of the batch (cancelled streams are ended here)."""
        if len(keep) == len(active):
            return cache
        kept = set(keep)
        for i, s in enumerate(active):
            if i not in kept and not s.done:
                self._end(s, None)
        active[:] = [active[i] for i in keep]
        return cache.select(keep) if keep else None

    def _sample(self, logits: torch.Tensor, streams: list[Stream]) -> list[int]:
        """Each row's next token: greedy rows in one argmax, sampled rows one by one with their generator."""
        out = [0] * len(streams)
        greedy = [i for i, s in enumerate(streams) if s.params.temperature == 0]
        if greedy:
            rows = logits if len(greedy) == len(streams) else logits[greedy]  # (g, v)
            none_seen = torch.empty(len(greedy), 0, dtype=torch.long)  # no repetition penalty
            for i, t in zip(greedy, sample_next(rows, none_seen, temperature=0).tolist()):
                out[i] = t
        for i, s in enumerate(streams):
            p = s.params
            if p.temperature == 0:
                continue
            token = sample_next(
                logits[i : i + 1],  # (1, v)
                torch.empty(1, 0, dtype=torch.long),
                temperature=p.temperature,
                top_k=p.top_k,
                top_p=p.top_p,
                generator=s.generator,
            )
            out[i] = int(token[0])
        return out

    def _accept(self, s: Stream, token: int) -> bool:
        """Take ``token`` as the stream's next; deliver its text. True when the stream has finished."""
        s.completion_tokens += 1
        s.last_token = token
        self._stats["tokens_generated"] += 1
        finish = None
        if s.cancelled:
            self._end(s, None)
            return True
        if token == self.tokenizer.eos_token_id:
            text, _ = s.stops.push(s.decoder.flush(), final=True)
            finish = "stop"
        else:
            text, stopped = s.stops.push(s.decoder.push(token))
            if stopped:
                finish = "stop"
            elif s.completion_tokens >= s.params.max_tokens:
                rest, stopped = s.stops.push(s.decoder.flush(), final=True)
                text += rest
                finish = "stop" if stopped else "length"
        if finish is None:
            if text:
                s.deliver(Event(text=text))
            return False
        self._end(s, Event(text=text, finish_reason=finish))
        return True

    def _end(self, s: Stream, event: Event | None) -> None:
        """The stream is over: deliver its last event (none for a cancelled one) and free its slot."""
        if s.done:
            return
        s.done = True
        s.cache = None
        s.prompt = None
        with self._lock:
            self._live -= 1
        if event is not None:
            event.prompt_tokens = s.prompt_tokens
            event.completion_tokens = s.completion_tokens
            s.deliver(event)
