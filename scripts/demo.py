"""`make demo`: build the demo model if missing, launch the shard(s), serve the demo prompts through the
router — base model and both demo adapters in the same batch — print each output and the speed, then
start the HTTP front (`qwen-router serve`) and make one OpenAI chat call and one lorax-client call
with an adapter, and stop everything (also on Ctrl-C: the launcher's shards die with it).

    python scripts/demo.py [--num-shard 2] [--out .demo] [--quantize int4|int8|fp8] [--speculate auto|medusa|lookup|off]

Speculative decoding: the demo's Medusa heads (OUT/adapters/medusa, trained by make_demo_model.py) serve as
every request's speculator when present (--speculate auto or medusa); without them, or with --speculate lookup,
prompt lookup (--speculative-tokens 4) drafts instead. The acceptance rate (tokens a request gains per decode
step; 1.00 = no gain) is printed next to the results; the outputs must not change.

--quantize int4/int8 serves a GPTQ copy of the demo model (scripts/quantize.py, calibrated on the demo
texts, group size 32; written once to OUT/model-int4 or -int8); fp8 quantizes the float model at load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router_client.messages import RouterStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT, ensure  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-shard", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, ".demo"))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--quantize", choices=["none", "int4", "int8", "fp8"], default="none")
    ap.add_argument("--speculate", choices=["auto", "medusa", "lookup", "off"], default="auto")
    args = ap.parse_args()

    t0 = time.time()
    print(f"building the demo model in {args.out} (once; seconds) ...", flush=True)
    ensure(args.out)
    model_dir, adapter_root = os.path.join(args.out, "model"), os.path.join(args.out, "adapters")
    extra = ["--quantize", "fp8"] if args.quantize == "fp8" else []
    if args.quantize in ("int4", "int8"):
        model_dir = quantized_copy(model_dir, os.path.join(args.out, f"model-{args.quantize}"), int(args.quantize[3:]))
    print(f"demo model ready ({time.time() - t0:.1f}s){'' if args.quantize == 'none' else ', ' + args.quantize}")
    spec_flags, spec_what = speculation(args.speculate, adapter_root)
    extra += spec_flags
    print(f"speculative decoding: {spec_what}")

    tmp = tempfile.mkdtemp(prefix="qwen-demo-")
    uds = os.path.join(tmp, "shard")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log_path = os.path.join(tmp, "shards.log")
    log = open(log_path, "w")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.launcher",
            model_dir,
            "--num-shard",
            str(args.num_shard),
            "--uds-path",
            uds,
            "--adapter-root",
            adapter_root,
            "--max-total-tokens",
            "8192",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        return run(args, model_dir, uds, launcher, log_path)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the shards")
        return 130
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def speculation(mode: str, adapter_root: str) -> tuple[list[str], str]:
    """The shard flags for `--speculate` and what they ask for."""
    medusa = os.path.isfile(os.path.join(adapter_root, "medusa", "config.json"))
    if mode == "off":
        return [], "off"
    if mode == "medusa" and not medusa:
        raise SystemExit(f"--speculate medusa: no Medusa heads in {adapter_root}/medusa (rebuild the demo model)")
    if medusa and mode in ("auto", "medusa"):
        return ["--speculative-adapter", "medusa"], "the demo's Medusa heads (adapters/medusa)"
    why = "" if mode == "lookup" else " (no Medusa heads in the demo directory)"
    return ["--speculative-tokens", "4"], f"prompt lookup, 4 drafts per step{why}"


def acceptance(speculate: int, stats: RouterStats) -> str:
    """The line about speculation: what the shards verify and the tokens gained per decode step."""
    if not speculate:
        return "speculative decoding: off (the shards report Info.speculate = 0)"
    return (
        f"speculative decoding: {speculate} drafts per step, {stats.accepted_per_step:.2f} accepted tokens per "
        f"decode step ({stats.decode_tokens} tokens in {stats.decode_rows} request-steps; 1.00 = no gain)"
    )


def quantized_copy(src: str, dst: str, bits: int) -> str:
    """A GPTQ Int`bits` copy of the demo model in dst (made once)."""
    if not os.path.isfile(os.path.join(dst, "config.json")):
        cmd = [sys.executable, os.path.join(ROOT, "scripts", "quantize.py"), src, dst]
        subprocess.run([*cmd, "--bits", str(bits), "--group-size", "32", "--method", "gptq"], check=True)
    return dst


def run(args, model_dir: str, uds: str, launcher: subprocess.Popen, log_path: str) -> int:
    from router_client.router import Router, RouterConfig
    from worker.tokenizer import QwenTokenizer

    deadline = time.time() + 120
    while not all(os.path.exists(f"{uds}-{r}") for r in range(args.num_shard)):
        if launcher.poll() is not None or time.time() > deadline:
            print("the shards did not start:\n" + open(log_path).read()[-3000:])
            return 1
        time.sleep(0.2)
    print(f"{args.num_shard} shard(s) serving on {uds}-*")
    tok = QwenTokenizer.from_dir(model_dir)
    config = RouterConfig(max_input_length=64, max_total_tokens=128, max_batch_prefill_tokens=1024)
    with Router.connect(f"{uds}-0", tokenizer=tok, config=config) as router:
        indices = {name: router.load_adapter(name) for name in ADAPTERS}
        jobs = [(p, "base", 0) for p, _ in BASE_TEXTS]
        jobs += [(STORY_PROMPT, name, idx) for name, idx in indices.items()]
        t0 = time.time()
        handles = [
            router.submit(p, {}, {"max_new_tokens": args.max_new_tokens}, adapter_index=idx) for p, _, idx in jobs
        ]
        results = [h.result(timeout=300) for h in handles]
        elapsed = time.time() - t0
        speculate, stats = router.info.speculate if router.info else 0, router.stats
    tokens = sum(r.generated_tokens for r in results)
    print()
    for (prompt, who, _), res in zip(jobs, results):
        skipped = f", {res.skipped_tokens} skipped" if speculate else ""
        print(f"[{who:>6}] {prompt!r} -> {res.text!r}  ({res.generated_tokens} tokens{skipped}, {res.finish_reason})")
    print(
        f"\n{len(results)} requests in one continuous batch, {tokens} tokens in {elapsed:.2f}s: "
        f"{tokens / elapsed:.0f} tokens/s on {args.num_shard} CPU shard(s)"
    )
    print(acceptance(speculate, stats))
    expected = {(p, "base"): c for p, c in BASE_TEXTS}
    expected.update({(STORY_PROMPT, name): cont for name, (_, _, cont) in ADAPTERS.items()})
    wrong = [(p, who) for (p, who, _), r in zip(jobs, results) if r.text != expected[(p, who)]]
    if wrong:
        print(f"UNEXPECTED outputs for {wrong}: the forward pass is broken")
        return 1
    print("every output is the sentence the model (or its adapter) was trained on")
    return http_front(model_dir, uds)


def http_front(model_dir: str, uds: str) -> int:
    """`qwen-router serve` on the same shards, called with the openai and lorax-client packages."""
    from http_front import front_command, start_front
    from worker.launcher import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    adapter_root = os.path.join(os.path.dirname(model_dir), "adapters")
    cmd = front_command(
        uds, model_dir, port, "--adapter-root", adapter_root, "--max-input-length", "96", "--max-total-tokens", "160"
    )
    print(f"\nHTTP front: {' '.join(['qwen-router', *cmd[3:]])}")
    try:
        front = start_front(cmd, port, timeout_s=120)
    except RuntimeError as err:
        print(err)
        return 1
    try:
        try:
            import openai
            from lorax import Client
        except ImportError as err:
            print(f"{err.name} is not installed (pip install openai lorax-client): skipping the client calls")
            return 0
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
            model="", messages=[{"role": "user", "content": "Hello!"}], max_tokens=16, temperature=0
        )
        print(
            f"openai chat ({url}/v1, ChatML, the demo model is not chat-trained): "
            f"{chat.choices[0].message.content!r} ({chat.usage.completion_tokens if chat.usage else '?'} tokens)"
        )
        story = Client(url).generate(STORY_PROMPT, adapter_id="pirate", max_new_tokens=48)
        print(f"lorax-client, adapter_id='pirate': {STORY_PROMPT!r} -> {story.generated_text!r}")
        return 0 if story.generated_text == ADAPTERS["pirate"][2] else 1
    finally:
        front.send_signal(signal.SIGTERM)
        try:
            front.wait(timeout=30)
        except subprocess.TimeoutExpired:
            front.kill()


if __name__ == "__main__":
    sys.exit(main())
