"""LoRAX's REST routes: `POST /` (what lorax-client and text-generation call), `/generate`,
`/generate_stream` (server-sent events, no `[DONE]`; one event per token, also when a speculative step
accepts several) and `/tokenize`. details.skipped_tokens is the shard's GeneratedText.skipped_tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from router_client.front.errors import validation
from router_client.front.flow import begin, collect, event_stream, finite, sse
from router_client.front.params import adapter_ref, is_sampling, sampling, stop_list, stopping, structured_schema
from router_client.front.schemas import (
    CompatGenerateRequest,
    GenerateRequest,
    GenerateResponse,
    Parameters,
    TokenizedPiece,
    TokenizeRequest,
    sse_content,
)
from router_client.front.service import Front, Job, Outcome, Run
from router_client.front.text import token_offsets
from router_client.requests import TokenEvent

SSE_DOC = sse_content("StreamResponse")
DETAILS = ("finish_reason", "prompt_tokens", "generated_tokens", "skipped_tokens", "seed", "prefill", "tokens")


def token_json(e: TokenEvent, alternatives: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": e.id, "text": e.text, "logprob": finite(e.logprob, 0.0), "special": e.special}
    if alternatives:
        out["alternative_tokens"] = [
            {"id": a.id, "text": a.text, "logprob": finite(a.logprob, -1e9)} for a in e.alternatives
        ]
    return out


def sequence_json(o: Outcome, p: Parameters, run: Run, i: int) -> dict[str, Any]:
    """generated_text, finish_reason, generated_tokens, seed, prefill and tokens of one sequence."""
    res = o.result
    assert res is not None
    prefill = (
        [{"id": t.id, "text": t.text, "logprob": finite(t.logprob)} for t in res.prefill_tokens]
        if p.decoder_input_details
        else []
    )
    if prefill:
        prefill[0]["logprob"] = None
    return {
        "generated_text": res.text,
        "finish_reason": res.finish_reason,
        "generated_tokens": res.generated_tokens,
        "skipped_tokens": res.skipped_tokens,
        "seed": res.seed,
        "prefill": prefill,
        "tokens": [token_json(e, bool(p.return_k_alternatives)) for e in o.events],
        "prompt_tokens": len(run.handles[i].prompt_ids),
    }


class LoraxRoutes:
    def __init__(self, front: Front) -> None:
        self.front = front

    def jobs(self, body: GenerateRequest, stream: bool) -> tuple[list[Job], str | None]:
        """The sequences to run (best_of of them) and the structured-output schema."""
        cfg, p = self.front.config, body.parameters or Parameters()
        schema = structured_schema(p.response_format, p.grammar)
        params = sampling(
            temperature=p.temperature,
            do_sample=bool(p.do_sample),
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            return_k_alternatives=p.return_k_alternatives or 0,
            watermark=bool(p.watermark),
            schema=schema,
        )
        best_of = p.best_of or 1
        if best_of > cfg.max_best_of:
            raise validation(f"best_of must be <= {cfg.max_best_of}, got {best_of}")
        if best_of > 1 and (stream or p.seed is not None or not is_sampling(params)):
            raise validation("best_of > 1 needs sampling, no seed, and no streaming")
        ids = self.front.tokenizer.encode(body.inputs)
        prompt_len = min(len(ids), p.truncate) if p.truncate else len(ids)
        max_new = p.max_new_tokens or max(1, self.front.router.config.max_total_tokens - prompt_len)
        stop = stopping(max_new, stop_list(p.stop, cfg.max_stop_sequences), bool(p.ignore_eos_token))
        job = Job(ids, params, stop, bool(p.decoder_input_details), p.truncate or 0)
        return [Job(ids, dict(params), dict(stop), job.prefill_logprobs, job.truncate) for _ in range(best_of)], schema

    async def start(self, body: GenerateRequest, request: Request, stream: bool) -> tuple[Run, Parameters]:
        self.front.metrics.request_received()
        p = body.parameters or Parameters()
        jobs, schema = self.jobs(body, stream)
        ref = adapter_ref(
            p.adapter_id,
            p.merged_adapters,
            p.adapter_source,
            self.front.config.adapter_source,
            p.api_token,
            base_ids=("", self.front.config.model_id),
        )
        return await begin(self.front, request, jobs, ref, schema is not None, stream), p

    async def generate(self, body: GenerateRequest, request: Request) -> dict[str, Any]:
        run, p = await self.start(body, request, stream=False)
        outcomes = await collect(self.front, run, request)
        seqs = [sequence_json(o, p, run, i) for i, o in enumerate(outcomes)]
        best = max(range(len(seqs)), key=lambda i: sum(t["logprob"] for t in seqs[i]["tokens"]))
        chosen = seqs[best]
        text = body.inputs + chosen["generated_text"] if p.return_full_text else chosen["generated_text"]
        out: dict[str, Any] = {"generated_text": text}
        if p.details or p.decoder_input_details:
            details = {k: chosen[k] for k in DETAILS}
            if len(seqs) > 1:
                details["best_of_sequences"] = [
                    {k: v for k, v in s.items() if k not in ("prompt_tokens", "skipped_tokens")}
                    for i, s in enumerate(seqs)
                    if i != best
                ]
            out["details"] = details
        return out

    async def generate_stream(self, body: GenerateRequest, request: Request) -> Any:
        run, p = await self.start(body, request, stream=True)
        return event_stream(self.front, run, self._events(run, p, body.inputs))

    async def _events(self, run: Run, p: Parameters, inputs: str) -> AsyncIterator[bytes]:
        """One event per token; the last token's event also carries generated_text and details."""
        last: TokenEvent | None = None
        alternatives = bool(p.return_k_alternatives)
        async for _, event in run.events():
            if event is not None and not event.last:
                yield sse({"token": token_json(event, alternatives), "generated_text": None, "details": None})
            elif event is not None:
                last = event  # sent with the result, which follows at once
            else:
                error, res = run.error(0), run.result(0)
                if error is not None or res is None or last is None:
                    error = error or validation("the generation ended without a token")
                    self.front.metrics.request_failed(error.error_type)
                    yield sse(error.body())
                    return
                run.record()
                text = inputs + res.text if p.return_full_text else res.text
                details = {
                    "finish_reason": res.finish_reason,
                    "prompt_tokens": len(run.handles[0].prompt_ids),
                    "generated_tokens": res.generated_tokens,
                    "skipped_tokens": res.skipped_tokens,
                    "seed": res.seed,
                }
                yield sse({"token": token_json(last, alternatives), "generated_text": text, "details": details})

    def tokenize(self, body: TokenizeRequest) -> list[dict[str, Any]]:
        text, ids, spans = token_offsets(self.front.tokenizer, body.inputs)
        return [{"id": i, "text": text[a:b], "start": a, "stop": b} for i, (a, b) in zip(ids, spans)]


def add_lorax_routes(app: FastAPI, front: Front, errors: dict[int | str, dict[str, Any]]) -> None:
    routes = LoraxRoutes(front)
    one = {200: {"model": list[GenerateResponse], "content": SSE_DOC}, **errors}

    @app.post("/", response_model=list[GenerateResponse], responses=one, summary="Generate (LoRAX / TGI clients)")
    async def compat_generate(body: CompatGenerateRequest, request: Request) -> Any:
        """Non-stream: a one-element list of GenerateResponse. With `stream`: /generate_stream's events."""
        if body.stream:
            return await routes.generate_stream(body, request)
        return JSONResponse([await routes.generate(body, request)])

    @app.post("/generate", response_model=GenerateResponse, responses=errors)
    async def generate(body: GenerateRequest, request: Request) -> Any:
        return JSONResponse(await routes.generate(body, request))

    @app.post(
        "/generate_stream",
        response_class=JSONResponse,
        responses={200: {"description": "server-sent StreamResponse events", "content": SSE_DOC}, **errors},
    )
    async def generate_stream(body: GenerateRequest, request: Request) -> Any:
        return await routes.generate_stream(body, request)

    @app.post("/tokenize", response_model=list[TokenizedPiece], responses=errors)
    async def tokenize(body: TokenizeRequest) -> Any:
        return JSONResponse(routes.tokenize(body))
