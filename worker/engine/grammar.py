"""JSON-schema constrained decoding with llguidance.

A request's `NextTokenChooserParameters.schema` is JSON Schema text (the HTTP front sends json_object as
{"type":"object"}, json_schema and TGI's `grammar` {type: json} as their schema). `Grammars.check` validates
it at Prefill without the tokenizer (well under a millisecond), so a bad schema is refused before any state
changes; `Grammars.compile` then builds the request's matcher on a thread pool while the batch's forward
runs, and the step waits for it only when it needs the first mask. The llguidance tokenizer is built once,
by the first compile. Masks are bitmasks computed on the CPU for all constrained rows at once (on
llguidance's own threads, which run without the GIL); the sampler applies them on the logits' device.

When a mask is computed: a row's next mask depends only on the tokens its matcher has consumed, so the
engine calls `Grammars.prefetch` once a step's tokens are consumed and the next forward (look-ahead) is
launched: the masks of the next step are then computed while that forward runs on the GPU (in the step's own
thread: handing the work to another thread costs GIL switches of up to 5 ms), or, without a look-ahead, in
the background while the step replies and the next Decode arrives. The next step takes them
(`Grammar.take_mask`) and computes only the rows that have none (a request whose compile was not done). A
matcher is never touched by two threads at once: the step waits for every row's mask before it samples,
and a row is consumed (and prefetched again) only after that.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import llguidance.torch
import tiktoken
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from worker.errors import InvalidArgument
from worker.tokenizer import QWEN_PATTERN, QwenTokenizer

log = logging.getLogger(__name__)

# At most one space between JSON tokens (outlines' default, hence LoRAX's): a model cannot spend its tokens on
# whitespace. A schema's own "x-guidance" options override these defaults.
JSON_DEFAULTS: llguidance._lib.JsonCompileOptions = {"whitespace_pattern": r"[ ]?"}


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may keep busy: its affinity, capped by a cgroup v2 CPU quota (containers often see all
    of the host's CPUs but may use only a share; llguidance's own default, 80% of os.cpu_count(), would then
    run more threads than the quota and stall the step thread with them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def lltokenizer(tok: QwenTokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of our vocabulary: the BPE tokens by id, the special tokens, every eos id an end token."""
    specials = {name: i for name, i in tok.special_tokens.items() if i < tok.n_real_vocab}
    ranks = {tok.decode_bytes([i]): i for i in range(tok.n_real_vocab) if i not in tok.special_ids}
    enc = tiktoken.Encoding("qwen-llguidance", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return lltokenizer_from_encoding(enc, n_vocab=tok.n_real_vocab, eos_token=sorted(tok.eos_token_ids))


class Grammar:
    """One request's matcher: compiled in the background, advanced once per accepted token."""

    def __init__(self, compiling: Future[llguidance.LLMatcher]):
        self._compiling = compiling
        self._matcher: llguidance.LLMatcher | None = None
        self._next: tuple[Future[torch.Tensor], int] | None = None  # prefetched next mask: (job, row of its result)

    @property
    def matcher(self) -> llguidance.LLMatcher:
        """The compiled matcher (waits for the compile the first time)."""
        if self._matcher is None:
            matcher = self._compiling.result()
            if matcher.is_error():
                raise InvalidArgument(f"invalid JSON schema: {matcher.get_error()}")
            self._matcher = matcher
        return self._matcher

    def consume(self, token_id: int) -> bool:
        """Advance by the sampled token; True when the output is complete (only an end token may follow)."""
        matcher = self.matcher
        if self._next is not None:  # a prefetched mask is for the state before this token: let its job finish
            self._next[0].exception()  # (it reads the matcher) and drop it
            self._next = None
        if not matcher.consume_token(token_id):  # the mask allowed it, so this is a bug: stop, never emit junk
            log.error(
                "constrained decoding: token %d was refused (%s); the request stops", token_id, matcher.get_error()
            )
            return True
        return bool(matcher.is_stopped())

    @property
    def compiled(self) -> bool:
        """The compile has finished (the matcher is available without waiting)."""
        return self._matcher is not None or self._compiling.done()

    @property
    def mask_ready(self) -> bool:
        """A prefetched mask of the current state is computed (take_mask returns it without waiting)."""
        return self._next is not None and self._next[0].done()

    def take_mask(self) -> torch.Tensor | None:
        """The prefetched mask of the current state ([W] int32, waits for its job), or None when there is none."""
        if self._next is None:
            return None
        job, row = self._next
        self._next = None
        return job.result()[row]


@dataclass
class Grammars:
    """The shard's llguidance state: the tokenizer (built at the first compile), a thread pool for compiles
    and an executor computing masks in parallel. Thread-safe where it says so; otherwise step-thread only."""

    tokenizer: QwenTokenizer
    compile_threads: int = 2
    mask_threads: int | None = None  # None: half the CPUs this process may use (usable_cpus), at least 1
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _lltok: llguidance.LLTokenizer | None = field(default=None, init=False, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _executor: llguidance.LLExecutor | None = field(default=None, init=False, repr=False)
    _mask_thread: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @staticmethod
    def check(schema: str) -> str:
        """The llguidance grammar of a JSON schema (text), validated; InvalidArgument names the problem."""
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            raise InvalidArgument(f"the JSON schema is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise InvalidArgument(f"the JSON schema must be a JSON object, got {type(parsed).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(parsed, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise InvalidArgument(f"invalid JSON schema: {exc}") from exc
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise InvalidArgument(f"invalid JSON schema: {messages[0]}")
        return grammar

    def compile(self, grammar: str) -> Grammar:
        """Start compiling a checked grammar on the pool; returns at once."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.compile_threads, thread_name_prefix="grammar")
        return Grammar(self._pool.submit(self._matcher, grammar))

    def _matcher(self, grammar: str) -> llguidance.LLMatcher:
        """Runs on the pool (llguidance releases the GIL while it compiles)."""
        with self._lock:  # the first compile builds the tokenizer (about a second for Qwen's 151k tokens)
            if self._lltok is None:
                self._lltok = lltokenizer(self.tokenizer)
            lltok = self._lltok
        return llguidance.LLMatcher(lltok, grammar, log_level=0)

    def start_masks(self, grammars: Sequence[Grammar | None]) -> Future[torch.Tensor | None] | None:
        """`masks` on a background thread, to overlap the step's forward (the matchers are not touched again
        before the result is taken); here and now when every row's mask is already computed (gathering rows
        is cheaper than a GIL handoff). None when no row has a grammar."""
        if all(g is None for g in grammars):
            return None
        if all(g is None or g.mask_ready for g in grammars):
            done: Future[torch.Tensor | None] = Future()
            done.set_result(self.masks(grammars))
            return done
        return self._thread().submit(self.masks, list(grammars))

    def prefetch(self, grammars: Sequence[Grammar | None], wait: bool = False) -> None:
        """Compute the next masks of these rows ahead of the step that needs them (call it after the step's tokens
        were consumed, for the requests that go on): in the background, or, with `wait`, here and now (the
        caller has started the next forward and would otherwise idle; llguidance's threads run without the GIL,
        so no other thread has to take it over)."""
        live = [g for g in grammars if g is not None and (g.compiled or not wait)]  # never wait for a compile here
        if not live:
            return
        job: Future[torch.Tensor]
        if wait:
            job = Future()
            try:
                job.set_result(self._fill(live))
            except Exception as exc:  # raised where the mask is taken, as a failed background job would be
                job.set_exception(exc)
        else:
            job = self._thread().submit(self._fill, live)
        for row, g in enumerate(live):
            g._next = (job, row)

    def masks(self, grammars: Sequence[Grammar | None]) -> torch.Tensor | None:
        """The allowed next tokens of each row as a bitmask [B, ceil(n_real_vocab / 32)] int32 on the CPU (bit j
        of word w: token 32·w + j); rows without a grammar allow everything. None when no row has a grammar.
        Rows with a prefetched mask take it; the others are computed now, together."""
        if all(g is None for g in grammars):
            return None
        bitmask = self._bitmask(len(grammars), pin=torch.cuda.is_available())  # the sampler copies it unblocking
        missing = []
        for i, g in enumerate(grammars):
            if g is None:
                continue
            ready = g.take_mask()
            if ready is None:
                missing.append((g.matcher, i))
            else:
                bitmask[i] = ready
        if missing:
            llguidance.torch.fill_next_token_bitmask_par(self._llexecutor(), missing, bitmask)
        return bitmask

    def _fill(self, grammars: Sequence[Grammar]) -> torch.Tensor:
        """The masks of these rows, computed together on llguidance's threads (runs on the mask thread)."""
        bitmask = self._bitmask(len(grammars), pin=False)
        llguidance.torch.fill_next_token_bitmask_par(
            self._llexecutor(), [(g.matcher, i) for i, g in enumerate(grammars)], bitmask
        )
        return bitmask

    def _bitmask(self, rows: int, pin: bool) -> torch.Tensor:
        shape = llguidance.torch.get_bitmask_shape(rows, self.tokenizer.n_real_vocab)
        return torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)

    def _llexecutor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            threads = self.mask_threads or max(1, usable_cpus() // 2)
            log.info("constrained decoding: masks on %d llguidance threads", threads)
            self._executor = llguidance.LLExecutor(threads)
        return self._executor

    def _thread(self) -> ThreadPoolExecutor:
        """The one thread that computes masks: jobs run in order, so a step's masks wait for the prefetch."""
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._mask_thread
