"""ShardedClient fan-out and merge rules over two fake shards, and the `qwen-router` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator

import grpc
import pytest
import test_router
from test_router import CONFIG, CharTokenizer
from test_router_fakes import serve_fakes, token_for

from router_client import cli
from router_client.client import ShardedClient, ShardError, ShardMismatchError, grpc_target
from router_client.router import Router
from worker.pb import generate_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
no_leaked_threads = test_router.no_leaked_threads  # the same autouse check: no threads left behind


def _batch(batch_id: int, *inputs: str) -> pb.Batch:
    reqs = [
        pb.Request(
            id=i,
            inputs=text,
            tokenized_inputs=pb.TokenizedInputs(ids=[1, 2]),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=3),
        )
        for i, text in enumerate(inputs)
    ]
    return pb.Batch(id=batch_id, requests=reqs, size=len(reqs))


def test_two_shards_fan_out_and_merge() -> None:
    with serve_fakes(world=2) as (prefix, shards):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG) as router:
            assert router.client.world_size == 2
            assert router.load_adapter("a1") == 1
            handles = [router.submit(f"prompt {i}", stopping={"max_new_tokens": 3 + i}) for i in range(4)]
            for h in handles:
                n = 3 + h.request_id
                assert h.result(timeout=5).token_ids == [token_for(h.request_id, s) for s in range(n)]
            assert router.health_probe()
        s0, s1 = shards
        assert s0.names()[0] == "ServiceDiscovery" and "ServiceDiscovery" not in s1.names()
        assert len(s0.of("DownloadAdapter")) == 1 and not s1.of("DownloadAdapter")
        same = [c for c in s0.calls if c[0] not in ("ServiceDiscovery", "DownloadAdapter")]
        assert same == s1.calls  # every other call reached both shards, in the same order


def test_shard_error_names_the_shard_and_waits_for_all() -> None:
    with serve_fakes(world=2) as (prefix, (s0, s1)):
        s0.fail_prefill_text = None  # only shard 1 fails
        with ShardedClient.connect(f"{prefix}-0", timeout_s=5) as client:
            with pytest.raises(ShardError) as info:
                client.prefill(_batch(7, "fail me"))
            err = info.value
            assert err.rank == 1 and err.code == grpc.StatusCode.INVALID_ARGUMENT and err.method == "Prefill"
            assert "shard 1" in str(err) and f"{prefix}-1" in str(err) and "boom on shard 1" in str(err)
            assert s0.of("Prefill") and 7 in s0.batches  # shard 0 ran it
            client.clear_cache(7)
            assert 7 not in s0.batches
            generations, batch = client.prefill(_batch(8, "a", "b", "c"))
            assert sorted(g.request_id for g in generations) == [0, 1, 2]  # rank 0 answers 0, 2; rank 1 answers 1
            assert [g.request_id for g in generations] == [0, 2, 1]
            assert batch is not None and batch.id == 8
            kept = client.filter_batch(8, [2, 0])
            assert list(kept.request_ids) == [2, 0]
            assert [h["x-fake-stats"] for h in client.health()] == [{"batches": 1}, {"batches": 1}]


def test_an_unreachable_shard_is_named_first() -> None:
    """A shard that died fails with UNAVAILABLE while its peers fail their broken collective: the error
    raised names the dead one, and lists the others."""
    from router_client.client import first_cause

    peer = ShardError(0, "unix:///s-0", "Decode", grpc.StatusCode.INTERNAL, "gloo: Connection reset by peer")
    dead = ShardError(1, "unix:///s-1", "Decode", grpc.StatusCode.UNAVAILABLE, "Socket closed")
    err = first_cause([peer, dead])
    assert isinstance(err, ShardError) and (err.rank, err.code) == (1, grpc.StatusCode.UNAVAILABLE)
    assert str(err) == "shard 1 (unix:///s-1) Decode failed: UNAVAILABLE: Socket closed (also failed: shard 0 INTERNAL)"
    refused = ShardError(1, "unix:///s-1", "Prefill", grpc.StatusCode.INVALID_ARGUMENT, "bad")
    assert first_cause([refused]) is refused
    lowest = first_cause([peer, refused])  # none unreachable: the lowest rank
    assert isinstance(lowest, ShardError) and lowest.rank == 0
    other = RuntimeError("closed")
    assert first_cause([other, peer]) is other


def test_info_and_warmup_merge_rules() -> None:
    with serve_fakes(world=2) as (prefix, (s0, s1)):
        s1.total_tokens = 40
        with ShardedClient.connect(f"{prefix}-0") as client:
            assert client.warmup(_batch(0, "x"), 16, 32, 8) == 40  # the minimum over shards
            assert client.info().block_size == 4
            s1.block_size = 8
            with pytest.raises(ShardMismatchError, match="block_size"):
                client.info()


def test_connect_to_missing_socket_is_a_clear_error(tmp_path) -> None:
    assert grpc_target("/tmp/qwen-0") == "unix:///tmp/qwen-0" == grpc_target("unix:///tmp/qwen-0")
    assert grpc_target("run/qwen-0") == "unix:run/qwen-0" and grpc_target("localhost:50051") == "localhost:50051"
    with pytest.raises(ConnectionError, match="no shard answered"):
        ShardedClient.connect(str(tmp_path / "nothing-0"), connect_timeout_s=0.3)


def test_without_block_allocator_requests_carry_no_blocks() -> None:
    with serve_fakes(world=1, requires_block_allocator=False) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG) as router:
            router.generate("hello", timeout=5, stopping={"max_new_tokens": 2})
            assert router.health_probe()
        assert all(f["blocks"] == [[]] and f["slots"] == [[]] for f in shard.of("Prefill"))


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def fake_tokenizer_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`worker.tokenizer.QwenTokenizer.from_dir` answering the one-token-per-char tokenizer."""
    module = types.ModuleType("worker.tokenizer")
    vars(module)["QwenTokenizer"] = types.SimpleNamespace(from_dir=lambda path: CharTokenizer())
    monkeypatch.setitem(sys.modules, "worker.tokenizer", module)


@pytest.fixture
def served() -> Iterator[tuple[str, list]]:
    with serve_fakes(world=2) as s:
        yield s


def test_cli_generate(served, fake_tokenizer_module, capsys) -> None:
    prefix, _ = served
    common = ["--uds-path", prefix, "--model-dir", "unused", "--max-new-tokens", "3"]
    assert cli.main(["generate", *common, "hello", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == [0, 1, 2] and out["finish_reason"] == "length" and out["adapter"] == "base"
    assert cli.main(["generate", *common, "hello", "--adapter", "a1", "--adapter", "a2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["adapter"] for line in lines] == ["a1", "a2"]
    assert cli.main(["generate", *common, "hello", "--stream"]) == 0
    assert capsys.readouterr().out == "<0><1><2>\n"


def test_cli_load(served, fake_tokenizer_module, capsys) -> None:
    prefix, _ = served
    argv = [
        "load",
        "--uds-path",
        prefix,
        "--model-dir",
        "unused",
        "--requests",
        "6",
        "--concurrency",
        "3",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] == 6 and summary["failed"] == 0 and summary["generated_tokens"] == 24
    assert set(summary["latency_s"]) == {"p50", "p90", "p99"}
    assert cli.main(argv[:-1]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_cli_errors_and_percentile(tmp_path, capsys) -> None:
    assert cli.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and cli.percentile([5.0], 99) == 5.0
    assert cli.percentile(list(range(1, 101)), 90) == 90
    assert cli.main(["health", "--uds-path", str(tmp_path / "none"), "--timeout", "0.2"]) == 1
    assert "no shard answered" in capsys.readouterr().err


def test_cli_imports_without_stubs() -> None:
    code = (
        "import sys; sys.modules['worker.pb'] = None; import router_client.cli as c; "
        "c.build_parser().parse_args(['generate', '--uds-path', 'p', 'x']); import router_client; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr


def test_cli_reports_skipped_tokens_and_the_acceptance(fake_tokenizer_module, capsys) -> None:
    with serve_fakes(world=1, speculate=3) as (prefix, (shard,)):
        common = ["--uds-path", prefix, "--model-dir", "unused", "--max-new-tokens", "9", "--json"]
        assert cli.main(["generate", *common, "hello"]) == 0
        out = json.loads(capsys.readouterr().out)
        steps = [ids for rid, ids in shard.sent if rid == 0]
        assert out["token_ids"] == [t for s in steps for t in s]
        assert out["skipped_tokens"] == sum(len(s) - 1 for s in steps) > 0
        shard.sent.clear()
        assert cli.main(["load", *common, "--requests", "3", "--concurrency", "3"]) == 0
        summary = json.loads(capsys.readouterr().out)
        by_request: dict[int, list[list[int]]] = {}
        for rid, ids in shard.sent:
            by_request.setdefault(rid, []).append(ids)
        rows = [ids for steps in by_request.values() for ids in steps[1:]]  # after each request's first token
    assert summary["accepted_tokens_per_decode_step"] == pytest.approx(sum(map(len, rows)) / len(rows), abs=1e-4)
