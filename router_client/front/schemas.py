"""Request and response shapes of LoRAX's REST API (as lorax-client 0.6.3 and text-generation 0.7.0
send and read them), plus the front's own small bodies. Requests are strict (no string-to-number
coercion, no NaN/Infinity); unknown keys are ignored and every optional parameter may be null, as
lorax-client sends each unset one as null. Limits that depend on the server's configuration
(max_new_tokens, stop count, best_of) are checked by the handlers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

U64 = 2**64
MAX_ADAPTER_ID = 256  # characters of one adapter id
MAX_MERGED_ADAPTERS = 8
MAX_STOP_CHARS = 256  # characters of one stop sequence
MAX_ALTERNATIVES = 100  # the shard's limit on return_k_alternatives
FinishReason = Literal["length", "eos_token", "stop_sequence"]


def sse_content(*event_models: str, done: bool = False) -> dict[str, Any]:
    """OpenAPI for a server-sent event stream: each event's `data` is one of these models (or an
    ErrorBody after the stream started) as JSON, or with `done` the text `[DONE]`."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{m}"} for m in (*event_models, "ErrorBody")]},
    }
    data = {"anyOf": [json_data, {"const": "[DONE]"}]} if done else json_data
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}}


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, populate_by_name=True)


class ErrorBody(BaseModel):
    error: str
    error_type: str


class MergedAdapters(Strict):
    ids: list[str] = Field(min_length=1, max_length=MAX_MERGED_ADAPTERS)
    weights: list[float] | None = None  # default: equal weights
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None
    density: float | None = Field(default=None, ge=0.0, le=1.0)
    majority_sign_method: Literal["total", "frequency"] | None = None


class JsonSchemaSpec(Strict):
    """OpenAI's `response_format.json_schema`."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """LoRAX's `{type, schema}` and OpenAI's `{type, json_schema: {schema}}` alike."""

    type: Literal["text", "json_object", "json_schema"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: JsonSchemaSpec | None = None


class Grammar(Strict):
    """TGI's `grammar`: a JSON schema (`json`); `regex` is refused (the shard takes JSON schemas only)."""

    type: Literal["json", "regex"]
    value: Any = None


class Parameters(Strict):
    adapter_id: str | None = Field(default=None, max_length=MAX_ADAPTER_ID)
    adapter_source: Literal["hub", "local", "s3", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    typical_p: float | None = Field(default=None, gt=0.0, le=1.0)
    do_sample: bool | None = None
    max_new_tokens: int | None = Field(default=None, ge=1, description="null: up to max_total_tokens")
    ignore_eos_token: bool | None = None
    return_full_text: bool | None = None
    stop: list[str] | None = None
    truncate: int | None = Field(default=None, ge=1)
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    return_k_alternatives: int | None = Field(default=None, ge=0, le=MAX_ALTERNATIVES)
    seed: int | None = Field(default=None, ge=0, lt=U64)
    response_format: ResponseFormat | None = None
    grammar: Grammar | None = None


class GenerateRequest(Strict):
    inputs: str = Field(min_length=1)
    parameters: Parameters | None = None


class CompatGenerateRequest(GenerateRequest):
    """`POST /`: a GenerateRequest with `stream` (non-stream answers a one-element list)."""

    stream: bool | None = None


class TokenizeRequest(Strict):
    inputs: str
    parameters: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------- responses


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first prompt token")


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]


class Details(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int = 0
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int = Field(0, description="tokens accepted beyond the first of a speculative step (not LoRAX's)")
    seed: int | None


class StreamResponse(BaseModel):
    """One `data:` event of /generate_stream (the last one carries generated_text and details)."""

    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizedPiece(BaseModel):
    id: int
    text: str
    start: int = Field(description="character offset in the NFC-normalised input")
    stop: int


class Info(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    num_shard: int
    block_size: int
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_client_batch_size: int
    max_input_length: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_size: int
    speculate: int
    preloaded_adapters: list[str]
    adapter_source: str
    version: str
    sha: str | None = None
    docker_label: str | None = None


class HealthBody(BaseModel):
    status: str
