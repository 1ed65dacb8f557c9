"""Contract test: proto/generate.proto must match LoRAX's generate.v1 on the wire.

The expected facts below were read from predibase/lorax proto/generate.proto
(main @ a7394ba386ece427d5a6125b419aa38b46d966dc; file last changed in
abf9f395ec5761047abbb40e854feb3ad0dbad5c). The router decodes by field number
and type, so any drift here silently breaks the worker <-> router protocol.
"""

import importlib
import os
import sys

import pytest
from google.protobuf import descriptor_pb2

FDP = descriptor_pb2.FieldDescriptorProto

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_pb():
    try:
        return importlib.import_module("worker.pb.generate_pb2")
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        import gen_proto  # noqa: E402  (stubs are not committed; build them on demand)

        assert gen_proto.main() == 0
        importlib.invalidate_caches()
        return importlib.import_module("worker.pb.generate_pb2")


pb = _load_pb()
FILE = pb.DESCRIPTOR
# Raw descriptor: its label/type/proto3_optional fields are stable across protobuf releases.
RAW = descriptor_pb2.FileDescriptorProto.FromString(FILE.serialized_pb)
RAW_MSGS = {m.name: m for m in RAW.message_type}

SCALARS = {
    FDP.TYPE_UINT32: "uint32",
    FDP.TYPE_UINT64: "uint64",
    FDP.TYPE_FLOAT: "float",
    FDP.TYPE_BOOL: "bool",
    FDP.TYPE_STRING: "string",
    FDP.TYPE_BYTES: "bytes",
}

# message -> [(field, number, type, label)]; label: "" singular, "opt" proto3 optional, "rep" repeated.
# Message/enum types are given by their short name.
EXPECTED = {
    "HealthRequest": [],
    "HealthResponse": [],
    "PreloadedAdapter": [
        ("adapter_parameters", 1, "AdapterParameters", ""),
        ("adapter_source", 2, "AdapterSource", ""),
        ("adapter_index", 3, "uint32", ""),
    ],
    "InfoRequest": [],
    "InfoResponse": [
        ("requires_padding", 1, "bool", ""),
        ("dtype", 2, "string", ""),
        ("device_type", 3, "string", ""),
        ("window_size", 4, "uint32", "opt"),
        ("block_size", 5, "uint32", ""),
        ("speculate", 6, "uint32", ""),
        ("preloaded_adapters", 7, "PreloadedAdapter", "rep"),
        ("supports_generation", 8, "bool", ""),
        ("supports_embeddings", 9, "bool", ""),
        ("supports_classification", 10, "bool", ""),
        ("chunked_prefill", 11, "bool", ""),
        ("requires_block_allocator", 12, "bool", ""),
    ],
    "ServiceDiscoveryRequest": [],
    "ServiceDiscoveryResponse": [("urls", 1, "string", "rep")],
    "ClearCacheRequest": [("id", 1, "uint64", "opt")],
    "ClearCacheResponse": [],
    "NextTokenChooserParameters": [
        ("temperature", 1, "float", ""),
        ("top_k", 2, "uint32", ""),
        ("top_p", 3, "float", ""),
        ("typical_p", 4, "float", ""),
        ("do_sample", 5, "bool", ""),
        ("seed", 6, "uint64", ""),
        ("repetition_penalty", 7, "float", ""),
        ("frequency_penalty", 8, "float", ""),
        ("presence_penalty", 9, "float", ""),
        ("watermark", 10, "bool", ""),
        ("adapter_id", 11, "string", ""),
        ("schema", 12, "string", "opt"),
        ("return_k_alternatives", 13, "uint32", ""),
    ],
    "StoppingCriteriaParameters": [
        ("max_new_tokens", 1, "uint32", ""),
        ("stop_sequences", 2, "string", "rep"),
        ("ignore_eos_token", 3, "bool", ""),
    ],
    "Image": [("data", 1, "bytes", ""), ("mimetype", 2, "string", "")],
    "InputChunk": [("text", 1, "string", ""), ("image", 2, "Image", "")],
    "TokenizedInputs": [("ids", 1, "uint32", "rep"), ("input_chunks", 2, "InputChunk", "rep")],
    "Request": [
        ("id", 1, "uint64", ""),
        ("inputs", 2, "string", ""),
        ("tokenized_inputs", 3, "TokenizedInputs", ""),
        ("truncate", 4, "uint32", ""),
        ("parameters", 5, "NextTokenChooserParameters", ""),
        ("stopping_parameters", 6, "StoppingCriteriaParameters", ""),
        ("prefill_logprobs", 7, "bool", ""),
        ("adapter_index", 8, "uint32", ""),
        ("blocks", 9, "uint32", "rep"),
        ("slots", 10, "uint32", "rep"),
        ("cache_len", 11, "uint32", ""),
        ("chunk_len", 12, "uint32", "opt"),
    ],
    "Batch": [
        ("id", 1, "uint64", ""),
        ("requests", 2, "Request", "rep"),
        ("size", 3, "uint32", ""),
        ("max_tokens", 4, "uint32", ""),
        ("max_blocks", 5, "uint32", ""),
    ],
    "CachedBatch": [
        ("id", 1, "uint64", ""),
        ("request_ids", 2, "uint64", "rep"),
        ("size", 3, "uint32", ""),
        ("max_tokens", 4, "uint32", ""),
        ("current_tokens", 5, "uint32", ""),
    ],
    "GeneratedText": [
        ("text", 1, "string", ""),
        ("generated_tokens", 2, "uint32", ""),
        ("skipped_tokens", 3, "uint32", ""),
        ("finish_reason", 4, "FinishReason", ""),
        ("seed", 5, "uint64", "opt"),
    ],
    "AlternativeTokens": [("ids", 1, "uint32", "rep"), ("logprobs", 2, "float", "rep"), ("texts", 3, "string", "rep")],
    "NextTokens": [
        ("ids", 1, "uint32", "rep"),
        ("logprobs", 2, "float", "rep"),
        ("texts", 3, "string", "rep"),
        ("is_special", 4, "bool", "rep"),
        ("alternative_tokens", 5, "AlternativeTokens", "rep"),
    ],
    "Generation": [
        ("request_id", 1, "uint64", ""),
        ("prefill_tokens", 2, "NextTokens", ""),
        ("next_tokens", 3, "NextTokens", ""),
        ("generated_text", 4, "GeneratedText", "opt"),
        ("prefill_tokens_length", 5, "uint32", ""),
    ],
    "FilterBatchRequest": [("batch_id", 1, "uint64", ""), ("request_ids", 2, "uint64", "rep")],
    "FilterBatchResponse": [("batch", 1, "CachedBatch", "")],
    "PrefillRequest": [("batch", 1, "Batch", ""), ("cached_batch", 2, "CachedBatch", "")],
    "PrefillResponse": [("generations", 1, "Generation", "rep"), ("batch", 2, "CachedBatch", "opt")],
    "DecodeRequest": [("batches", 1, "CachedBatch", "rep")],
    "DecodeResponse": [("generations", 1, "Generation", "rep"), ("batch", 2, "CachedBatch", "opt")],
    "Embedding": [("request_id", 1, "uint64", ""), ("values", 2, "float", "rep")],
    "EmbedRequest": [("batch", 1, "Batch", "")],
    "EmbedResponse": [("embeddings", 1, "Embedding", "rep"), ("errorMsg", 2, "string", "")],
    "Entity": [
        ("entity", 1, "string", ""),
        ("score", 2, "float", ""),
        ("index", 3, "uint32", ""),
        ("word", 4, "string", ""),
        ("start", 5, "uint32", ""),
        ("end", 6, "uint32", ""),
    ],
    "EntityList": [
        ("request_id", 1, "uint64", ""),
        ("entities", 2, "Entity", "rep"),
        ("input_ids", 4, "uint32", "rep"),
    ],
    "ClassifyPredictionList": [
        ("request_id", 1, "uint64", ""),
        ("predictions", 2, "string", "rep"),
        ("scores", 3, "float", "rep"),
    ],
    "ClassifyRequest": [("batch", 1, "Batch", "")],
    "ClassifyResponse": [
        ("classify_prediction_lists", 1, "ClassifyPredictionList", "rep"),
        ("errorMsg", 2, "string", ""),
    ],
    "WarmupRequest": [
        ("batch", 1, "Batch", ""),
        ("max_input_length", 2, "uint32", ""),
        ("max_prefill_tokens", 3, "uint32", ""),
        ("max_new_tokens", 4, "uint32", ""),
    ],
    "WarmupResponse": [("max_supported_total_tokens", 1, "uint32", "opt")],
    "AdapterParameters": [
        ("adapter_ids", 1, "string", "rep"),
        ("weights", 2, "float", "rep"),
        ("merge_strategy", 3, "MergeStrategy", ""),
        ("density", 4, "float", ""),
        ("majority_sign_method", 5, "MajoritySignMethod", ""),
    ],
    "DownloadAdapterRequest": [
        ("adapter_parameters", 1, "AdapterParameters", ""),
        ("adapter_source", 2, "AdapterSource", ""),
        ("api_token", 3, "string", "opt"),
    ],
    "DownloadAdapterResponse": [("downloaded", 1, "bool", ""), ("memory_fraction", 2, "float", "")],
    "LoadAdapterRequest": [
        ("adapter_parameters", 1, "AdapterParameters", ""),
        ("adapter_source", 2, "AdapterSource", ""),
        ("adapter_index", 3, "uint32", ""),
        ("api_token", 4, "string", "opt"),
    ],
    "LoadAdapterResponse": [("loaded", 1, "bool", "")],
    "OffloadAdapterRequest": [
        ("adapter_parameters", 1, "AdapterParameters", ""),
        ("adapter_source", 2, "AdapterSource", ""),
        ("adapter_index", 3, "uint32", ""),
    ],
    "OffloadAdapterResponse": [("offloaded", 1, "bool", "")],
}

EXPECTED_ENUMS = {
    "FinishReason": {"FINISH_REASON_LENGTH": 0, "FINISH_REASON_EOS_TOKEN": 1, "FINISH_REASON_STOP_SEQUENCE": 2},
    "AdapterSource": {"HUB": 0, "S3": 1, "LOCAL": 2, "PBASE": 3},
    "MergeStrategy": {"LINEAR": 0, "TIES": 1, "DARE_LINEAR": 2, "DARE_TIES": 3},
    "MajoritySignMethod": {"TOTAL": 0, "FREQUENCY": 1},
}

EXPECTED_METHODS = {
    "Info": ("InfoRequest", "InfoResponse"),
    "ServiceDiscovery": ("ServiceDiscoveryRequest", "ServiceDiscoveryResponse"),
    "ClearCache": ("ClearCacheRequest", "ClearCacheResponse"),
    "FilterBatch": ("FilterBatchRequest", "FilterBatchResponse"),
    "Warmup": ("WarmupRequest", "WarmupResponse"),
    "Prefill": ("PrefillRequest", "PrefillResponse"),
    "Embed": ("EmbedRequest", "EmbedResponse"),
    "Classify": ("ClassifyRequest", "ClassifyResponse"),
    "Decode": ("DecodeRequest", "DecodeResponse"),
    "Health": ("HealthRequest", "HealthResponse"),
    "DownloadAdapter": ("DownloadAdapterRequest", "DownloadAdapterResponse"),
    "LoadAdapter": ("LoadAdapterRequest", "LoadAdapterResponse"),
    "OffloadAdapter": ("OffloadAdapterRequest", "OffloadAdapterResponse"),
}


def _describe(f):
    if f.type in (FDP.TYPE_MESSAGE, FDP.TYPE_ENUM):
        assert f.type_name.startswith(".generate.v1."), f.type_name
        typ = f.type_name.rsplit(".", 1)[1]
    else:
        typ = SCALARS[f.type]
    if f.label == FDP.LABEL_REPEATED:
        label = "rep"
    elif f.proto3_optional:
        label = "opt"
    else:
        assert f.label == FDP.LABEL_OPTIONAL  # plain proto3 singular
        label = ""
    return (f.name, f.number, typ, label)


def test_package_and_service():
    assert RAW.package == "generate.v1"
    assert RAW.syntax == "proto3"
    assert [s.name for s in RAW.service] == ["LoraxService"]
    svc = FILE.services_by_name["LoraxService"]
    assert svc.full_name == "generate.v1.LoraxService"
    got = {m.name: (m.input_type.name, m.output_type.name) for m in svc.methods}
    assert got == EXPECTED_METHODS
    for m in RAW.service[0].method:  # all unary-unary
        assert not m.client_streaming and not m.server_streaming


def test_message_set_is_exact():
    assert set(RAW_MSGS) == set(EXPECTED)
    assert not RAW.dependency  # self-contained, no imports


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_message_fields(name):
    assert [_describe(f) for f in RAW_MSGS[name].field] == EXPECTED[name]


def test_input_chunk_oneof():
    # The only real (non-synthetic) oneof in the file is InputChunk.chunk = {text, image}.
    real = []
    for m in RAW.message_type:
        for i, o in enumerate(m.oneof_decl):
            members = [f.name for f in m.field if f.HasField("oneof_index") and f.oneof_index == i]
            if not any(f.proto3_optional for f in m.field if f.HasField("oneof_index") and f.oneof_index == i):
                real.append((m.name, o.name, members))
    assert real == [("InputChunk", "chunk", ["text", "image"])]


def test_enums():
    got = {e.name: {v.name: v.number for v in e.value} for e in RAW.enum_type}
    assert got == EXPECTED_ENUMS


def test_grpc_stub_paths():
    grpc_mod = importlib.import_module("worker.pb.generate_pb2_grpc")
    assert hasattr(grpc_mod, "LoraxServiceStub")
    assert hasattr(grpc_mod, "LoraxServiceServicer")
    assert hasattr(grpc_mod, "add_LoraxServiceServicer_to_server")


def test_wire_roundtrip_smoke():
    req = pb.Request(
        id=7,
        inputs="hi",
        tokenized_inputs=pb.TokenizedInputs(ids=[1, 2, 3]),
        adapter_index=2,
        blocks=[0, 1],
        slots=list(range(20)),
        cache_len=4,
        chunk_len=16,
        parameters=pb.NextTokenChooserParameters(temperature=0.5, return_k_alternatives=3),
    )
    back = pb.Request.FromString(req.SerializeToString())
    assert back == req and back.HasField("chunk_len")
    assert not pb.Request(id=1).HasField("chunk_len")
