"""OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, as the `openai` client calls
them. `model` names an adapter ("" or the base model's id: none). Streams end with `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with `choices: []` and the usage. Stop sequences
are cut out of the text, as OpenAI does. Streams send one chunk per token, also when a speculative
step accepts several at once; usage counts every accepted token."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from router_client.front.chat import CHAT_STOPS, ROLES, Turn, chatml_ids
from router_client.front.errors import validation
from router_client.front.flow import begin, collect, event_stream, sse
from router_client.front.openai_answers import (
    FINISH,
    adapter_dirs,
    chat_logprob,
    completion_logprobs,
    mean_logprob,
    message_text,
)
from router_client.front.openai_schemas import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ModelList,
    SamplingFields,
)
from router_client.front.params import adapter_ref, sampling, stop_list, stopping, structured_schema
from router_client.front.schemas import sse_content
from router_client.front.service import Front, Job, Outcome, Run
from router_client.front.text import StopTrimmer, trim_stop
from router_client.requests import TokenEvent


@dataclass
class Plan:
    """What one OpenAI request runs: its jobs (choice c of prompt p is job p * per_prompt + c) and how
    the answer is shaped."""

    jobs: list[Job]
    per_prompt: int  # sequences generated per prompt (best_of, or n)
    n: int  # choices returned per prompt
    stops: list[str]  # the user's, cut out of the text
    schema: str | None
    id: str
    created: int
    model: str


class OpenAIRoutes:
    def __init__(self, front: Front) -> None:
        self.front = front
        self.fingerprint = f"qwen-worker-{front.config.version}"

    # ------------------------------------------------------------------ request → jobs

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.front.tokenizer.n_real_vocab
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise validation(f"prompt token ids must be a non-empty list of ids in [0, {vocab})")
        return ids

    def _plan(
        self,
        req: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        per_prompt: int,
        n: int,
        extra_stops: tuple[str, ...],
        k_alternatives: int,
        prefix: str,
    ) -> Plan:
        cfg = self.front.config
        if n > cfg.max_best_of or per_prompt > cfg.max_best_of:
            raise validation(f"n and best_of must be <= {cfg.max_best_of}")
        if req.logit_bias:
            raise validation("logit_bias is not supported")
        stops = stop_list(req.stop, cfg.max_stop_sequences)
        schema = structured_schema(req.response_format, None)
        params = sampling(
            temperature=1.0 if req.temperature is None else req.temperature,
            do_sample=True,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            return_k_alternatives=k_alternatives,
            schema=schema,
        )
        total = self.front.router.config.max_total_tokens
        jobs = [
            Job(
                ids,
                dict(params),
                stopping(max_tokens or max(1, total - len(ids)), stops + list(extra_stops), bool(req.ignore_eos_token)),
            )
            for ids in prompts
            for _ in range(per_prompt)
        ]
        return Plan(
            jobs,
            per_prompt,
            n,
            stops,
            schema,
            f"{prefix}-{uuid.uuid4().hex}",
            int(time.time()),
            req.model or cfg.model_id,
        )

    async def _start(self, req: SamplingFields, plan: Plan, request: Request) -> Run:
        self.front.metrics.request_received()
        ref = adapter_ref(
            req.model,
            None,
            req.adapter_source,
            self.front.config.adapter_source,
            req.api_token,
            base_ids=("", self.front.config.model_id),
        )
        return await begin(self.front, request, plan.jobs, ref, plan.schema is not None, bool(req.stream))

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """A string, token ids, or a list of either: the prompts' ids."""
        tok = self.front.tokenizer
        if isinstance(prompt, str):
            return [tok.encode(prompt)]
        if prompt and all(isinstance(x, int) for x in prompt):
            return [self._check_ids([int(x) for x in prompt])]  # type: ignore[arg-type]
        return [tok.encode(x) if isinstance(x, str) else self._check_ids(list(x)) for x in prompt]  # type: ignore[arg-type]

    def completion_plan(self, req: CompletionRequest) -> Plan:
        cfg = self.front.config
        if req.suffix:
            raise validation("suffix is not supported")
        if req.echo and req.logprobs is not None:
            raise validation("echo with logprobs is not supported")
        prompts = self._prompts(req.prompt)
        if not prompts or len(prompts) > cfg.max_client_batch_size:
            raise validation(f"prompt: between 1 and {cfg.max_client_batch_size} prompts")
        n = req.n or 1
        best_of = req.best_of or n
        if best_of < n or (req.stream and best_of > n):
            raise validation("best_of must be >= n, and equal to n when streaming")
        return self._plan(req, prompts, req.max_tokens or 16, best_of, n, (), req.logprobs or 0, "cmpl")

    def chat_plan(self, req: ChatRequest) -> Plan:
        if req.tools:
            raise validation("tool calls are not supported")
        turns = [Turn(ROLES[m.role], message_text(m)) for m in req.messages]
        ids = chatml_ids(self.front.tokenizer, turns)
        k = (req.top_logprobs or 0) if req.logprobs else 0
        n = req.n or 1
        return self._plan(req, [ids], req.max_completion_tokens or req.max_tokens, n, n, CHAT_STOPS, k, "chatcmpl")

    # ------------------------------------------------------------------ answers

    def _base(self, plan: Plan, kind: str) -> dict[str, Any]:
        return {
            "id": plan.id,
            "object": kind,
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": self.fingerprint,
        }

    def _chosen(self, plan: Plan, outcomes: list[Outcome]) -> list[tuple[int, Outcome]]:
        """(job index, outcome) of the returned choices: per prompt, the n best by mean token logprob."""
        out = []
        for start in range(0, len(outcomes), plan.per_prompt):
            group = list(range(start, start + plan.per_prompt))
            if plan.per_prompt > plan.n:
                group.sort(key=lambda j: -mean_logprob(outcomes[j]))
            out += [(j, outcomes[j]) for j in group[: plan.n]]
        return out

    def _usage(self, plan: Plan, run: Run, chosen: list[int]) -> dict[str, int]:
        prompt = sum(len(run.handles[j].prompt_ids) for j in range(0, len(plan.jobs), plan.per_prompt))
        completion = sum(run.handles[j].result(0).generated_tokens for j in chosen)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        plan = self.completion_plan(req)
        run = await self._start(req, plan, request)
        if req.stream:
            return event_stream(self.front, run, self._chunks(plan, run, req, "text_completion"))
        outcomes = await collect(self.front, run, request)
        choices = []
        for index, (j, o) in enumerate(self._chosen(plan, outcomes)):
            assert o.result is not None
            text = trim_stop(o.result.text, plan.stops)
            echo = self.front.tokenizer.decode(run.handles[j].prompt_ids) if req.echo else ""
            choices.append(
                {
                    "index": index,
                    "text": echo + text,
                    "finish_reason": FINISH[o.result.finish_reason],
                    "logprobs": completion_logprobs(o.events) if req.logprobs is not None else None,
                }
            )
        usage = self._usage(plan, run, [j for j, _ in self._chosen(plan, outcomes)])
        return JSONResponse({**self._base(plan, "text_completion"), "choices": choices, "usage": usage})

    async def chat(self, req: ChatRequest, request: Request) -> Any:
        plan = self.chat_plan(req)
        run = await self._start(req, plan, request)
        if req.stream:
            return event_stream(self.front, run, self._chunks(plan, run, req, "chat.completion.chunk"))
        outcomes = await collect(self.front, run, request)
        choices = []
        for index, (_j, o) in enumerate(self._chosen(plan, outcomes)):
            assert o.result is not None
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": trim_stop(o.result.text, plan.stops)},
                    "finish_reason": FINISH[o.result.finish_reason],
                    "logprobs": {"content": [chat_logprob(e) for e in o.events if not e.special]}
                    if req.logprobs
                    else None,
                }
            )
        usage = self._usage(plan, run, [j for j, _ in self._chosen(plan, outcomes)])
        return JSONResponse({**self._base(plan, "chat.completion"), "choices": choices, "usage": usage})

    async def _chunks(self, plan: Plan, run: Run, req: Any, kind: str) -> AsyncIterator[bytes]:
        """Stream chunks of every choice as tokens come (n == per_prompt here: every job is a choice)."""
        chat = kind == "chat.completion.chunk"
        base = self._base(plan, kind)
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if usage_on else {}
        logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        trimmers = [StopTrimmer(plan.stops) for _ in plan.jobs]

        def chunk(
            i: int, text: str | None, finish: str | None = None, event: TokenEvent | None = None, role: bool = False
        ) -> bytes:
            lp = None
            if event is not None and logprobs:
                lp = {"content": [chat_logprob(event)]} if chat else completion_logprobs([event])
            if chat:
                delta = {"role": "assistant", "content": text} if role else {} if text is None else {"content": text}
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": lp}
            return sse({**base, "choices": [choice], **extra})

        for i in range(len(plan.jobs)):
            if chat:
                yield chunk(i, "", role=True)
            elif req.echo:
                yield chunk(i, self.front.tokenizer.decode(run.handles[i].prompt_ids))
        async for i, event in run.events():
            if event is None:
                error, res = run.error(i), run.result(i)
                if error is not None or res is None:
                    error = error or validation("the generation ended without a result")
                    self.front.metrics.request_failed(error.error_type)
                    yield sse(error.body())
                    return
                tail = trimmers[i].flush()
                if tail:
                    yield chunk(i, tail)
                yield chunk(i, None if chat else "", FINISH[res.finish_reason])
            elif not event.special or logprobs:
                text = trimmers[i].push(event.text) if not event.special else ""
                if text or (logprobs and not event.special):
                    yield chunk(i, text, event=event if not event.special else None)
        run.record()
        if usage_on:
            yield sse({**base, "choices": [], "usage": self._usage(plan, run, list(range(len(plan.jobs))))})
        yield b"data: [DONE]\n\n"

    def models(self) -> dict[str, Any]:
        cfg = self.front.config
        ids = {ids[0] for ids in (a.ids for a in self.front.router.adapters.values()) if len(ids) == 1}
        ids |= set(adapter_dirs(cfg.adapter_root)) if cfg.adapter_root else set()
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": self.front.started, "owned_by": "qwen-worker"}
                for m in [cfg.model_id, *sorted(ids)]
            ],
        }


def add_openai_routes(app: FastAPI, front: Front, errors: dict[int | str, dict[str, Any]]) -> None:
    routes = OpenAIRoutes(front)
    text_chunks, chat_chunks = (
        sse_content("Completion", done=True),
        sse_content("ChatCompletionChunk", done=True),
    )

    @app.post("/v1/completions", response_model=Completion, responses={200: {"content": text_chunks}, **errors})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await routes.completions(body, request)

    @app.post(
        "/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": chat_chunks}, **errors}
    )
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await routes.chat(body, request)

    @app.get("/v1/models", response_model=ModelList, responses={401: errors[401]})
    async def models() -> Any:
        return JSONResponse(routes.models())
