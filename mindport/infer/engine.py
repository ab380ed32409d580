"""Continuous batching: requests join and leave a running decode batch at step boundaries.

Design (B = max_batch, L = max_len, n = running requests of a model):

- Each model name has a :class:`~mindport.infer.decoder.CompiledDecoder` whose caches hold B slot
  rows of L positions. Running requests are kept *compact*: they
  occupy rows [0, n), so a decode step computes the first b rows, b the smallest batch bucket
  (1, 2, 4, ..., B) >= n, with no gather of scattered slots inside the graph (a gather's indices
  would have to come from a Parameter, which MindSpore 2.10 on CPU was seen reading out of order:
  :class:`~mindport.transformer.kv_cache.StaticLayerCache`). A finished, cancelled or timed-out
  request frees its row at once: the last row is copied into it (one row per layer, once per
  request). Rows [n, b) compute padding, written only into their own free rows.
- A newcomer is prefilled alone at a step boundary, in row 0 (whose request first moves to row n),
  its prompt right-padded to a power of two (>= 8) so that few graphs compile. Newcomers are admitted
  before each decode step while rows are free, so prefill interleaves with decoding.
- Every row has its own length: its write position, causal mask and RoPE tables (TeleChat2's
  dynamic NTK depends on the row's own total length) are its own, so a request's tokens do not
  depend on what else is running (dropless MoE; with ``capacity_factor`` > 0 expert capacity counts
  the whole step's tokens, padding rows included, and outputs then depend on batching).
- Models with different names never share a step (no per-row adapters). Each name is a whole
  model: a LoRA adapter loaded with ``AutoModelForCausalLM.from_pretrained(base, adapter=DIR)``
  costs a full copy of the base weights plus its own B x L caches (2 x layers x B x Nkv x L x D
  values); caches are built at a name's first request.
- A request's timeout counts its own time, not the engine's compiles: the first call of each graph
  (a new batch bucket or prefill width) pushes the deadlines of all live requests back by its duration.
- Sampling is per request, on the host, with :func:`mindport.infer.generate.sample_next` and the
  request's own ``numpy`` generator: a seed gives the same tokens batched or alone.
- Tensor parallelism (msrun): rank 0 schedules; before every compiled call it broadcasts a fixed-size
  int64 plan (operation, model, rows, tokens, positions) over the tensor-parallel group and the
  other ranks, in :meth:`Engine.run_follower`, run the same call; a shutdown plan ends them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from mindspore import Tensor

from mindport.infer.decoder import CompiledDecoder
from mindport.infer.generate import sample_next
from mindport.parallel.comm import collectives


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0        # 0 -> greedy (argmax)
    top_p: float = 1.0
    seed: int | None = None         # per-request generator: same seed -> same tokens, batched or alone
    stop_token_ids: frozenset[int] = frozenset()   # end-of-turn / eos ids


@dataclass(frozen=True)
class TokenEvent:
    """Passed to a request's callback, on the engine's thread."""
    request_id: int
    token: int | None               # the new token (None on a final event that adds no token)
    finish_reason: str | None       # None while running; "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class QueueFull(Exception):
    """The waiting queue is full, or the engine is shutting down."""


@dataclass(eq=False)
class _Request:
    id: int
    model: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent], None]
    deadline: float | None
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    length: int = 0                 # positions in its cache row
    cancelled: bool = False


# plan operations broadcast to the tensor-parallel followers
_SHUTDOWN, _STEP, _MOVE = 0, 1, 2
_HEADER = 4  # operation, model index, rows b, width S
MIN_PREFILL = 8  # prompts are right-padded to a power of two >= this: few prefill graphs compile


def buckets(max_batch: int) -> list[int]:
    """Decode batch sizes compiled: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class Engine:
    """Continuous-batching scheduler over ``models`` (name -> CausalLM); see the module docstring.

    ``submit``/``cancel``/``stats``/``shutdown`` may be called from any thread; callbacks run on the
    engine's thread and must be cheap. MindSpore runs one graph at a time per process ("Nested
    execution during JIT execution" otherwise): while the engine runs, its models are used through
    it only.
    """

    def __init__(self, models: dict, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None):
        if not models:
            raise ValueError("models: empty: expected at least one name -> model")
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch = {max_batch}, max_queue = {max_queue}: expected max_batch >= 1, "
                             f"max_queue >= 0")
        self.models = dict(models)
        self.names = sorted(self.models)
        self.max_batch, self.max_queue = max_batch, max_queue
        limit = min(m.config.max_position_embeddings for m in self.models.values())
        self.max_len = max_len or limit
        if self.max_len < 2 or (self.max_len > limit and any(m.config.rope_scaling == "none"
                                                             for m in self.models.values())):
            raise ValueError(f"max_len = {self.max_len}: expected 2 <= max_len <= max_position_embeddings = {limit} "
                             f"(only TeleChat2's dynamic NTK RoPE extends past it)")
        if any(m.groups.sequence_parallel for m in self.models.values()):
            raise ValueError("use_seq_parallel: serving decodes one token per step; run it with "
                             "use_seq_parallel: False (tensor parallelism alone)")
        self.buckets = buckets(max_batch)
        first = self.models[self.names[0]]
        self._comm = collectives(first.groups.tp)
        self._plan_size = _HEADER + max(self.max_len, max_batch) + 3 * max_batch
        self._running: dict[str, list[_Request]] = {name: [] for name in self.names}
        self._waiting: list[_Request] = []
        self._live: dict[int, _Request] = {}  # every request not finished yet, by id
        self._lock = threading.Condition()
        self._next_id = 0
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._followers_stopped = False
        self._compiled: set[tuple[int, ...]] = set()  # plan headers (operation, model, b, S) called once
        self._counts = {"requests": 0, "completed": 0, "generated_tokens": 0, "prompt_tokens": 0}

    # ------------------------------------------------------------------ public interface
    def start(self) -> None:
        """Run the scheduling loop on its own thread (rank 0)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mindport-engine", daemon=True)
            self._thread.start()

    def submit(self, model: str, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[TokenEvent], None], timeout: float | None = None) -> int:
        """Queue a request; returns its id. QueueFull when the queue is full or shutting down;
        ValueError (one line) for a bad request."""
        self._check(model, prompt_ids, params, timeout)
        with self._lock:
            if not self._accepting:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests waiting: the queue holds max_queue = {self.max_queue}")
            request = _Request(self._next_id, model, [int(t) for t in prompt_ids], params, on_event,
                               None if timeout is None else time.monotonic() + timeout,
                               np.random.default_rng(params.seed))
            self._next_id += 1
            self._counts["requests"] += 1
            self._waiting.append(request)
            self._live[request.id] = request
            self._lock.notify_all()
            return request.id

    def cancel(self, request_id: int) -> None:
        """Finish the request with "cancelled" at the next step boundary (unknown ids: no-op)."""
        with self._lock:
            if request_id in self._live:
                self._live[request_id].cancelled = True
                self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {"running": sum(len(r) for r in self._running.values()), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "max_len": self.max_len,
                    "models": list(self.names), **self._counts}

    def shutdown(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; finish the running and waiting requests if ``drain`` (else cancel them),
        within ``timeout`` seconds (then cancel the rest); stop the loop and the followers."""
        with self._lock:
            self._accepting = False
            if not drain:
                for request in self._live.values():
                    request.cancelled = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._thread is not None and self._live:
                if time.monotonic() >= deadline:  # the loop finishes them at its next boundary
                    for request in self._live.values():
                        request.cancelled = True
                self._lock.wait(min(max(deadline - time.monotonic(), 0.0), 1.0) or 1.0)
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._cancel_all()
        if self._comm.group.size > 1 and not self._followers_stopped:
            self._broadcast(self._plan(_SHUTDOWN, 0, np.zeros((0, 1), np.int64)))
            self._followers_stopped = True

    def run_follower(self) -> None:
        """Ranks != 0 under tensor parallelism: run rank 0's steps until it shuts down."""
        while True:
            plan = self._broadcast(np.zeros(self._plan_size, np.int64))
            if plan[0] == _SHUTDOWN:
                return
            self._execute(plan)

    # ------------------------------------------------------------------ validation
    def _check(self, model: str, prompt_ids, params: SamplingParams, timeout) -> None:
        if model not in self.models:
            raise ValueError(f"model '{model}': unknown: expected one of {self.names}")
        vocab = self.models[model].config.vocab_size
        if len(prompt_ids) == 0:
            raise ValueError("prompt: empty: expected at least one token")
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab})")
        if not isinstance(params.max_tokens, (int, np.integer)) or params.max_tokens < 1:
            raise ValueError(f"max_tokens = {params.max_tokens}: expected an integer >= 1")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ValueError(f"max_tokens = {params.max_tokens}: prompt ({len(prompt_ids)}) + max_tokens exceeds "
                             f"the context of {self.max_len} tokens")
        if not params.temperature >= 0 or not np.isfinite(params.temperature):
            raise ValueError(f"temperature = {params.temperature}: expected a finite number >= 0 (0: greedy)")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p = {params.top_p}: expected 0 < top_p <= 1")
        if params.seed is not None and not (isinstance(params.seed, (int, np.integer)) and params.seed >= 0):
            raise ValueError(f"seed = {params.seed}: expected None or an integer >= 0")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout = {timeout}: expected a positive number of seconds")

    # ------------------------------------------------------------------ scheduling loop (rank 0)
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not any(self._running.values()):
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self._iterate()
            except Exception as exc:  # the loop survives; the requests it held fail
                self._fail_all(exc)
            with self._lock:
                self._lock.notify_all()  # shutdown() waits for the requests to finish
        self._cancel_all()

    def _iterate(self) -> None:
        """One step boundary: drop cancelled / timed-out requests, prefill newcomers while rows are
        free, then one decode step per model with running requests."""
        with self._lock:
            finished = self._drop_cancelled_and_expired()
            admitted = self._admit()
        self._emit(finished)
        for request in admitted:
            self._run_guarded([request], lambda r=request: self._prefill(r))
        for name in self.names:
            rows = self._running[name]
            if rows:
                self._run_guarded(list(rows), lambda name=name: self._decode(name))

    def _drop_cancelled_and_expired(self) -> list[tuple[_Request, TokenEvent]]:
        """Under the lock: finish cancelled / timed-out requests and free their rows."""
        now, events = time.monotonic(), []
        for request in list(self._live.values()):
            reason = "cancelled" if request.cancelled else (
                "timeout" if request.deadline is not None and now >= request.deadline else None)
            if reason:
                events.append(self._finish(request, reason))
        return events

    def _admit(self) -> list[_Request]:
        """Under the lock: waiting requests in arrival order while rows are free."""
        free = self.max_batch - sum(len(r) for r in self._running.values())
        admitted, self._waiting = self._waiting[:free], self._waiting[free:]
        return admitted

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> tuple[_Request, TokenEvent]:
        """Remove ``request`` (freeing its row: the last row moves into it) and build its final event."""
        del self._live[request.id]
        if request in self._waiting:
            self._waiting.remove(request)
        rows = self._running[request.model]
        if request in rows:
            row, last = rows.index(request), len(rows) - 1
            if row != last:
                self._move(request.model, last, row)
                rows[row] = rows[last]
            rows.pop()
        self._counts["completed"] += 1
        return request, TokenEvent(request.id, None, reason, len(request.prompt), len(request.tokens), error)

    def _cancel_all(self) -> None:
        with self._lock:
            events = [self._finish(r, "cancelled") for r in list(self._live.values())]
        self._emit(events)

    def _fail_all(self, exc: Exception) -> None:
        """Finish every request with "error", rows dropped without moving (their caches are rewritten
        by the next prefill)."""
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        with self._lock:
            failed = list(self._live.values())
            self._live.clear()
            self._waiting.clear()
            for rows in self._running.values():
                rows.clear()
            self._counts["completed"] += len(failed)
        self._emit([(r, TokenEvent(r.id, None, "error", len(r.prompt), len(r.tokens), message)) for r in failed])

    def _run_guarded(self, requests: list[_Request], work: Callable[[], list]) -> None:
        """Run ``work`` (a prefill or decode returning events); a failure finishes ``requests`` with "error"."""
        try:
            events = work()
        except Exception as exc:  # a failing step must not kill the loop
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            with self._lock:
                events = [self._finish(r, "error", message) for r in requests if r.id in self._live]
        self._emit(events)

    @staticmethod
    def _emit(events: list[tuple[_Request, TokenEvent]]) -> None:
        for request, event in events:
            try:
                request.on_event(event)
            except Exception:  # a callback must not break the loop or the other requests
                pass

    # ------------------------------------------------------------------ steps
    def _prefill(self, request: _Request) -> list:
        with self._lock:
            rows = self._running[request.model]
            if rows:
                self._move(request.model, 0, len(rows))
                rows.append(rows[0])
                rows[0] = request
            else:
                rows.append(request)
        p = len(request.prompt)
        width = min(max(1 << (p - 1).bit_length(), MIN_PREFILL), self.max_len)
        ids = np.zeros((1, width), np.int64)
        ids[0, :p] = request.prompt
        logits = self._run(_STEP, request.model, ids, np.array([0]), np.array([p]))
        with self._lock:
            request.length = p
            self._counts["prompt_tokens"] += p
        return self._sampled([request], logits[:, p - 1])

    def _decode(self, name: str) -> list:
        rows = list(self._running[name])
        n = len(rows)
        b = next(size for size in self.buckets if size >= n)
        ids = np.zeros((b, 1), np.int64)
        starts = np.zeros(b, np.int64)
        for i, request in enumerate(rows):
            ids[i, 0], starts[i] = request.tokens[-1], request.length
        logits = self._run(_STEP, name, ids, starts, np.ones(b, np.int64), n)
        for request in rows:
            request.length += 1
        return self._sampled(rows, logits[:n, 0])

    def _sampled(self, rows: list[_Request], logits: np.ndarray) -> list:
        """Sample each row's next token, record it and build the events; finish stopped rows."""
        events = []
        with self._lock:
            for request, row_logits in zip(rows, logits):
                params = request.params
                token = int(sample_next(row_logits[None], request.rng, params.temperature > 0, params.temperature,
                                        0, params.top_p)[0])
                request.tokens.append(token)
                self._counts["generated_tokens"] += 1
                reason = "stop" if token in params.stop_token_ids else (
                    "length" if len(request.tokens) >= params.max_tokens else None)
                events.append((request, TokenEvent(request.id, token, reason, len(request.prompt),
                                                   len(request.tokens))))
                if reason:
                    self._finish(request, reason)
        return events

    # ------------------------------------------------------------------ compiled calls (all ranks)
    def _decoder(self, name: str) -> CompiledDecoder:
        """Model ``name``'s decoder, shared through ``model.compiled_decoders`` with other engines and
        generate() calls of the same (rows, length): a model serves one of them at a time."""
        model, key = self.models[name], (self.max_batch, self.max_len)
        if key not in model.compiled_decoders:
            model.compiled_decoders[key] = CompiledDecoder(model, self.max_batch, self.max_len)
        return model.compiled_decoders[key]

    def _plan(self, operation: int, model: int, ids: np.ndarray, starts=(), lengths=(), active: int = 0) -> np.ndarray:
        plan = np.zeros(self._plan_size, np.int64)
        b, s = ids.shape
        plan[:_HEADER] = operation, model, b, s
        body = np.concatenate([ids.reshape(-1), np.asarray(starts, np.int64), np.asarray(lengths, np.int64),
                               [active]])
        plan[_HEADER:_HEADER + len(body)] = body
        return plan

    def _broadcast(self, plan: np.ndarray) -> np.ndarray:
        if self._comm.group.size == 1:
            return plan
        return self._comm.broadcast(Tensor(plan), 0).asnumpy()

    def _run(self, operation: int, name: str, ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
             active: int = 1) -> np.ndarray:
        """Broadcast the plan (tensor parallelism) and execute it; logits (b, S, V) as numpy."""
        return self._call(self._plan(operation, self.names.index(name), ids, starts, lengths, active))

    def _move(self, name: str, src: int, dst: int) -> None:
        self._call(self._plan(_MOVE, self.names.index(name), np.array([[src, dst]])))

    def _call(self, plan: np.ndarray):
        """Broadcast ``plan`` and execute it; a graph's first call (its compile) is not counted against
        the live requests' deadlines."""
        graph = tuple(int(x) for x in plan[:_HEADER])
        started = time.monotonic()
        out = self._execute(self._broadcast(plan))
        if graph not in self._compiled:
            self._compiled.add(graph)
            compile_time = time.monotonic() - started
            with self._lock:
                for request in self._live.values():
                    if request.deadline is not None:
                        request.deadline += compile_time
        return out

    def _execute(self, plan: np.ndarray):
        operation, model, b, s = (int(x) for x in plan[:_HEADER])
        decoder = self._decoder(self.names[model])
        body = plan[_HEADER:]
        ids = body[:b * s].reshape(b, s)
        if operation == _MOVE:
            decoder.move_row(Tensor(ids[0, :1].astype(np.int32)), Tensor(ids[0, 1:].astype(np.int32)))
            return None
        starts, lengths = body[b * s:b * s + b], body[b * s + b:b * s + 2 * b]
        active = int(body[b * s + 2 * b])
        write = np.zeros((decoder.slots, 1, self.max_len, 1), np.float32)
        for i in range(active):
            write[i, 0, starts[i]:starts[i] + lengths[i], 0] = 1.0
        inputs = decoder.row_inputs(ids, starts, lengths)
        logits = decoder.step(*inputs[:4], Tensor(write), inputs[4])
        return logits.astype("float32").asnumpy()
