"""LoRA decode's "gemm" mode (issue 17, P2): the base weight and its A pool in one allocation
(worker/adapters/slots.py `joint_layout`), one GEMM giving the base output and every slot's h, then
`lora_expand_rows` (worker/kernels/lora_rows.py) writing the output: the layout, the pool, LoraTerm and the tiny
model, on the CPU through the Triton interpreter against float64 (y[t] = base + B[s] A[s] x[t], or the float64
reference model with each adapter merged). The kernels alone: test_lora_rows.py."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

if "worker.kernels.lora" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

from lora_helpers import lora_target, term_f64  # noqa: E402
from worker.adapters.slots import GEMM_MAX_RANK, SlotPool, joint_layout  # noqa: E402
from worker.distributed import ParallelContext  # noqa: E402
from worker.kernels import lora as kernels  # noqa: E402
from worker.layers import lora as lora_layer  # noqa: E402
from worker.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from worker.layers.lora import AdapterBatchData, LoraTerm  # noqa: E402

CPU = ParallelContext(device=torch.device("cpu"))


def test_joint_layout_keeps_the_base_and_aliases_the_pool():
    """The base's weight and bias become views of the joint allocation with their values; a later load
    writes through; the A rows are zero and are the pool (a write to one shows in the other); quantized
    or other linears get none."""
    col = ColumnParallelLinear(6, [8, 4], True, CPU, torch.float32)
    col.weight.data.normal_()
    col.bias.data.normal_()
    w0, b0 = col.weight.clone(), col.bias.clone()
    joint = joint_layout(col, (3, 1, 2, 6), torch.float32, CPU.device)
    assert joint is not None and joint.weight.shape == (12 + 6, 6) and joint.out == 12
    assert torch.equal(col.weight, w0) and torch.equal(col.bias, b0)
    assert col.weight.data_ptr() == joint.weight.data_ptr() and col.bias.data_ptr() == joint.bias.data_ptr()
    assert not joint.weight[12:].any() and not joint.bias[12:].any()
    col.store(torch.ones(12, 6), torch.full((12,), 2.0))  # a load after the layout writes into it
    assert torch.equal(joint.weight[:12], torch.ones(12, 6)) and torch.equal(joint.bias[:12], torch.full((12,), 2.0))
    row = RowParallelLinear(6, 5, True, CPU, torch.float32)
    joint = joint_layout(row, (2, 1, 3, 6), torch.float32, CPU.device)
    assert joint is not None and joint.bias is None  # a row-parallel bias is added after the reduce
    assert joint_layout(row, (2, 1, 3, 6), torch.float16, CPU.device) is None  # another dtype than the pool's
    assert joint_layout(row, (2, 1, 3, 6), torch.float32, torch.device("meta")) is None  # another device
    assert joint_layout(torch.nn.Linear(6, 5), (2, 1, 3, 6), torch.float32, CPU.device) is None


def test_slot_pool_a_pool_is_the_joint_rows_and_modes_follow_the_flag():
    """SlotPool's A pool of a float target is a view of the joint rows; --lora-decode picks "gemm" on
    it (auto: while the A rows add at most 55 % to the base rows), "side" never; no kernels: "two"."""
    col = ColumnParallelLinear(6, [8, 8], False, CPU, torch.float32)
    target = lora_target("mlp.gate_up", col, ("mlp.w2", "mlp.w1"))
    pool = SlotPool([target], CPU, torch.float32, max_rank=2, num_slots=1)  # 2 slots x 2 parts x 2 = 8 rows
    a, _ = pool.stacked[(0, "mlp.gate_up")]
    joint = pool.joints[(0, "mlp.gate_up")]
    a[1, 1, 0] = 7.0
    assert torch.equal(joint.weight[16 + (1 * 2 + 1) * 2], torch.full((6,), 7.0))
    key = (0, "mlp.gate_up")
    assert pool.decode_mode(key, kernels, None, "gemm") == "gemm"
    assert pool.decode_mode(key, kernels, None, "auto") == "gemm"  # 8 extra rows: 50 % of 16
    narrow = SlotPool([target], CPU, torch.float32, max_rank=3, num_slots=1)  # 12 extra rows: 75 %
    assert narrow.decode_mode(key, kernels, None, "auto") == "two"
    assert pool.decode_mode(key, kernels, None, "side") == "two"
    assert pool.decode_mode(key, None, None, "gemm") == "two"
    with pytest.raises(ValueError, match="--lora-decode 'fast'"):
        pool.decode_mode(key, kernels, None, "fast")
    big = SlotPool([target], CPU, torch.float32, max_rank=1, num_slots=1)  # 4 extra rows of 16: auto takes gemm
    assert big.decode_mode(key, kernels, None, "auto") == "gemm"
    # past GEMM_MAX_RANK lanes a slot auto keeps the other modes (the gemm kernels' tiles spill there:
    # scripts/lora_compile.py), though the A rows add little; --lora-decode gemm still takes it
    wide = ColumnParallelLinear(6, [2048, 2048], False, CPU, torch.float32)
    target = lora_target("mlp.gate_up", wide, ("mlp.w2", "mlp.w1"))
    assert GEMM_MAX_RANK == 64
    for rank, mode in ((64, "gemm"), (65, "two"), (128, "two")):
        pool = SlotPool([target], CPU, torch.float32, max_rank=128, num_slots=1, rank=rank)  # 2 x 2 x r A rows
        assert pool.decode_mode(key, kernels, None, "auto") == mode, rank
        assert pool.decode_mode(key, kernels, None, "gemm") == "gemm"
        pool.set_rank(128)  # past it once the pools grow (the A rows: 12.5 %)
        assert pool.decode_mode(key, kernels, None, "auto") == "two", rank


def test_lora_term_gemm_equals_the_definition_and_falls_back(monkeypatch):
    """LoraTerm "gemm" on a decode batch (one segment per row) gives base + term (float64 loop); below
    JOINT_MIN_ROWS rows it runs "side_store"'s path, same values; eager decode's segments (adapter rows only)
    take the joint path too, their other rows on slot 0; a step with a prompt's rows (max_len 1 among the
    adapter rows, but not every request one token) runs the segments."""
    g = torch.Generator().manual_seed(3)
    col = ColumnParallelLinear(24, [10, 10, 10], True, CPU, torch.float32)
    col.weight.data.normal_(generator=g)
    col.bias.data.normal_(generator=g)
    a_shape = (3, 1, 4, 24)
    joint = joint_layout(col, a_shape, torch.float32, CPU.device)
    a = joint.weight[joint.out :].view(a_shape)
    a[1:].normal_(generator=g)
    b = torch.randn(3, 1, 30, 4, generator=g)
    b[0] = 0
    ranks = torch.tensor([[0, 4, 2]], dtype=torch.int32)
    a[2, 0, 2:] = 0
    b[2, 0, :, 2:] = 0
    term = LoraTerm(a, b, ranks, kernels, None, decode="gemm", joint=joint)
    slots = torch.tensor([1, 0, 2, 2, 1, 0, 1, 2, 0, 1])  # 10 rows
    x = torch.randn(len(slots), 24, generator=g)
    calls = []
    real = kernels.lora_expand_rows
    monkeypatch.setattr(kernels, "lora_expand_rows", lambda *args, **kw: calls.append(1) or real(*args, **kw))

    def base():
        return torch.nn.functional.linear(x, col.weight, col.bias)

    cases = ((10, "graphed"), (10, "eager"), (5, "graphed"), (10, "mixed"))  # 5 < JOINT_MIN_ROWS: the side path
    for rows, kind in cases:
        calls.clear()
        if kind == "graphed":  # graphed decode: one segment per row
            data = AdapterBatchData.for_decode(slots[:rows])
        elif kind == "eager":  # eager decode: segments of the adapter rows only
            data = AdapterBatchData.build(slots[:rows].tolist(), [1] * rows, "cpu")
        else:  # a base prompt of 3 rows beside one-token adapter rows: not a decode step, the segments run
            data = AdapterBatchData.build([0, *slots[3:rows].tolist()], [3] + [1] * (rows - 3), "cpu")
            assert data.max_len == 1 and data.row_slots is None
        y = term.apply(lambda n=rows: base()[:n], x[:rows], data)
        assert len(calls) == (1 if rows >= lora_layer.JOINT_MIN_ROWS and kind != "mixed" else 0)
        for t in range(rows):
            s = 0 if kind == "mixed" and t < 3 else int(slots[t])
            want = col.weight.double() @ x[t].double() + col.bias.double() + term_f64(x[t], a, b, s, ranks)
            torch.testing.assert_close(y[t].double(), want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="'gemm' needs the joint weight"):
        LoraTerm(a, b, ranks, kernels, None, decode="gemm")


@pytest.mark.parametrize(
    "act_shrink,term_first,norm_shrink",
    [(False, False, False), (True, False, False), (True, True, False), (False, False, True), (True, True, True)],
)
def test_model_decode_in_gemm_mode_fuses_the_activation(tmp_path, monkeypatch, act_shrink, term_first, norm_shrink):
    """The tiny model (fused kernels, Triton interpreter) decoding with adapters in "gemm" mode: the MLP's
    gate|up runs the joint GEMM and one expand+activation launch per layer (no separate SiLU-mul), the other
    targets one expand each, and the logits equal the float64 reference with each adapter merged. act_shrink:
    mlp.c_proj's h from the gate|up launch, summed by its expand; norm_shrink: c_attn's h from ln_1's launch;
    term_first: those terms computed before their GEMMs (the term-only launch), which add them (addmm)."""
    from lora_helpers import count_launches, interpreted_lora_decode
    from reference import ref_forward

    run = interpreted_lora_decode(tmp_path, seed=23, fused=True, lens=(4, 7, 3), which=(2, 0, 1))
    for term in run.terms:
        term.decode = "gemm"
        term.act_shrink = act_shrink
        term.term_first = term_first
        term.norm_shrink = norm_shrink
    monkeypatch.setattr(lora_layer, "JOINT_MIN_ROWS", 1)
    launches = count_launches(monkeypatch)
    added: list[int] = []  # the output width of each term computed before its GEMM (the GEMM's C)
    term_only = kernels.lora_term_rows_partials

    def recording(parts, b_pool, *args, **kw):
        added.append(b_pool.shape[2])
        return term_only(parts, b_pool, *args, **kw)

    monkeypatch.setattr(kernels, "lora_term_rows_partials", recording)
    out = run.paged.step([0, 1, 2], run.seqs, [len(s) - 1 for s in run.seqs], run.alphas, False, run.slots)
    layers = run.cfg["num_hidden_layers"]
    assert launches.count("_expand_rows_act_kernel") == layers and "_silu_mul_kernel" not in launches
    # the targets whose h the joint GEMM computes: c_attn (unless norm_shrink), attn.c_proj, mlp.c_proj (unless
    # act_shrink); the others' expand sums partials
    assert launches.count("_expand_rows_kernel") == (3 - act_shrink - norm_shrink) * layers
    assert launches.count("_expand_rows_partials_kernel") == (act_shrink + norm_shrink) * layers
    assert launches.count("_norm_shrink_kernel") == (layers if norm_shrink else 0)
    assert launches.count("_rms_norm_kernel") == (layers + 1 if norm_shrink else 2 * layers + 1)  # ln_2s, ln_f
    hidden = run.cfg["hidden_size"]
    assert added.count(hidden) == (layers if term_first and act_shrink else 0)  # mlp.c_proj's term as C
    assert added.count(3 * hidden) == (layers if term_first and norm_shrink else 0)  # c_attn's (q|k|v)
    for s, p, a, o in zip(run.seqs, run.prompts, run.which, out):
        worst = (o[-1].double() - ref_forward(run.merged[a], run.cfg, s, prompt_len=len(p))[-1]).abs().max().item()
        assert worst <= 1e-4, worst


def test_the_gemm_expand_takes_pdl_from_lora_pdl_only():
    """DecodeKernels.lora_pdl (not pdl, which measured slower for this expand) sets the "gemm" expand's PDL,
    through the wrapper's set_decode_kernels and at wrap time from the base's choices."""
    from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels

    col = ColumnParallelLinear(6, [8], False, CPU, torch.float32)
    col.set_decode_kernels(DecodeKernels(lora_pdl=True))
    owner = torch.nn.Module()
    owner.lin = col
    target = SimpleNamespace(owner=owner, attr="lin", layer=0, key="attn.c_attn", modules=("attn.c_attn",))
    SlotPool([target], CPU, torch.float32, max_rank=2, num_slots=1).wrap_targets(kernels, None, "gemm")
    term = owner.lin.lora
    assert term.decode == "gemm" and term.pdl
    apply_decode_kernels(owner, DecodeKernels(pdl=True))
    assert not term.pdl and owner.lin.base.decode_kernels.pdl
    apply_decode_kernels(owner, DecodeKernels(lora_pdl=True))
    assert term.pdl


def test_quantized_bases_keep_their_own_pools_and_auto_takes_gemm_on_float():
    """GPTQ and FP8 linears get no joint layout (their A pools are separate zeros, their decode mode "side" /
    "two"); a float model's every target gets one."""
    from helpers import TINY
    from worker.config import QwenConfig
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.quant.config import FP8Config, GPTQConfig

    cfg = QwenConfig.from_dict(TINY)
    for quant in (GPTQConfig(4, 32, True, False, source="test"), FP8Config(), None):
        model = FlashQwenForCausalLM(cfg, CPU, torch.float32, quant=quant)
        pool = SlotPool(model.lora_targets(), CPU, torch.float32, max_rank=4, num_slots=2)
        keys = {(t.layer, t.key) for t in model.lora_targets()}
        assert set(pool.joints) == (keys if quant is None else set()), quant
        modes = {pool.decode_mode(k, kernels, None, "gemm") for k in keys}
        assert modes == ({"gemm"} if quant is None else {"two"}), quant


def test_lora_decode_flag_reaches_the_targets(tmp_path, caplog):
    """serve --lora-decode: the parser's choices, AdapterManager.from_args, the wrapped targets' mode, and a
    warning when "gemm" is asked for but a target cannot take it (here: no Triton kernels, the torch path)."""
    import logging

    from helpers import TINY
    from worker import cli
    from worker.adapters.pool import AdapterManager
    from worker.config import QwenConfig
    from worker.models.qwen import FlashQwenForCausalLM

    parse = cli.build_parser().parse_args
    assert parse(["serve", "m"]).lora_decode == "auto"
    with pytest.raises(SystemExit):
        parse(["serve", "m", "--lora-decode", "fast"])
    cfg = QwenConfig.from_dict(TINY)
    for flag, kernels_on, want in (("gemm", True, "gemm"), ("side", True, "two"), ("gemm", False, "two")):
        backend = ["--lora-backend", "triton" if kernels_on else "torch"]
        args = parse(
            ["serve", "m", "--lora-decode", flag, "--max-lora-rank", "4", "--max-adapter-slots", "2", *backend]
        )
        args.adapter_root = str(tmp_path)
        model = FlashQwenForCausalLM(cfg, CPU, torch.float32)
        mgr = AdapterManager.from_args(args, model, CPU, triton_interpreter=kernels_on)
        with caplog.at_level(logging.WARNING, logger="worker"):
            caplog.clear()
            mgr.attach(SimpleNamespace(model=model, batches={}, adapters=None))
        modes = {getattr(t.owner, t.attr).lora.decode for t in model.lora_targets()}
        assert modes == {want}, (flag, kernels_on, modes)
        warned = any("--lora-decode gemm" in r.getMessage() for r in caplog.records)
        assert warned == (flag == "gemm" and not kernels_on)
    with pytest.raises(ValueError, match="--lora-decode 'fast'"):
        AdapterManager("", model, CPU, torch.float32, 4, 2, lora_decode="fast")


def test_gemm_mode_after_eviction_and_a_lower_rank_refill(tmp_path):
    """A slot freed and refilled with a lower-rank adapter has zeros in the lanes past the new rank, in A (the
    joint rows) and in B, which the "gemm" expand reads whole (lora_expand_rows relies on it)."""
    from helpers import TINY
    from lora_helpers import attach_manager, load, write_adapter
    from worker.config import QwenConfig
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.pb import generate_pb2 as pb

    model = FlashQwenForCausalLM(QwenConfig.from_dict(TINY), CPU, torch.float32)
    root = str(tmp_path)
    write_adapter(root, "r16", TINY, 16, 16, seed=1)
    write_adapter(root, "r4", TINY, 4, 8, seed=2)
    mgr, _ = attach_manager(model, root, max_rank=16, num_slots=1)
    load(mgr, 1, "r16")
    slot = mgr.entries[1].slot
    mgr.offload(pb.OffloadAdapterRequest(adapter_index=1))
    load(mgr, 2, "r4")
    assert mgr.entries[2].slot == slot
    for t in model.lora_targets():
        lora = getattr(t.owner, t.attr).lora
        a, b = lora.a_pool[slot], lora.b_pool[slot]
        assert lora.joint is not None and a.data_ptr() >= lora.joint.weight.data_ptr()  # A is the joint rows
        assert not a[:, 4:].any() and not b[:, :, 4:].any(), t.key  # the rank-16 adapter's lanes are gone
        assert a[:, :4].any() and b[:, :, :4].any(), t.key


def test_a_load_that_fails_after_its_fill_leaves_its_slot_zero(tmp_path, monkeypatch):
    """LoadAdapter fails after the fill wrote the slot (here: attaching the adapter's Medusa heads raises): the slot is
    zeroed again, so a lower-rank adapter loaded into it next has zeros past its rank in A and B, which the "gemm"
    kernels read (worker/kernels/lora_rows.py)."""
    from helpers import TINY
    from lora_helpers import attach_manager, load, write_adapter
    from worker.config import QwenConfig
    from worker.models.qwen import FlashQwenForCausalLM

    model = FlashQwenForCausalLM(QwenConfig.from_dict(TINY), CPU, torch.float32)
    root = str(tmp_path)
    write_adapter(root, "r16", TINY, 16, 16, seed=1)
    write_adapter(root, "r4", TINY, 4, 8, seed=2)
    mgr, _ = attach_manager(model, root, max_rank=16, num_slots=1)

    def attach_fails(ckpt, slot):
        raise MemoryError("no room for the heads")

    monkeypatch.setattr(mgr.medusa, "attach", attach_fails)
    with pytest.raises(MemoryError):
        load(mgr, 1, "r16")
    assert 1 not in mgr.entries
    monkeypatch.undo()
    load(mgr, 2, "r4")
    slot = mgr.entries[2].slot
    for t in model.lora_targets():
        lora = getattr(t.owner, t.attr).lora
        a, b = lora.a_pool[slot], lora.b_pool[slot]
        assert not a[:, 4:].any() and not b[:, :, 4:].any(), t.key  # nothing of the failed rank-16 load is left
        assert a[:, :4].any() and b[:, :, :4].any(), t.key
