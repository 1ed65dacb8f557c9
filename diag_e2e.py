"""Scratch (not committed): the demo through the router under several shard flags; OK/BAD per request."""
import os, sys, tempfile
sys.path[:0] = ["tests", "scripts"]
from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT, ensure
from router_client.router import Router, RouterConfig
from shards import start_launcher, stop
from worker.tokenizer import QwenTokenizer
demo_dir = os.environ.get("QWEN_DEMO_DIR") or ensure(tempfile.mkdtemp())
model_dir = os.path.join(demo_dir, "model")
for spec in sys.argv[1:]:
    args = spec.split()
    n, use_ad = int(args[0]), args[1] == "ad"
    shard = start_launcher(model_dir, os.path.join(demo_dir, "adapters"), n, tuple(args[2:]))
    try:
        cfg = RouterConfig(max_input_length=64, max_total_tokens=128, max_batch_prefill_tokens=1024)
        with Router.connect(f"{shard.uds}-0", tokenizer=QwenTokenizer.from_dir(model_dir), config=cfg) as router:
            jobs = [(p, 0, c) for p, c in BASE_TEXTS]
            if use_ad:
                idx = {name: router.load_adapter(name) for name in ADAPTERS}
                jobs += [(STORY_PROMPT, idx[k], ADAPTERS[k][2]) for k in ADAPTERS]
            handles = [router.submit(p, {}, {"max_new_tokens": 48}, adapter_index=i) for p, i, _ in jobs]
            results = [h.result(timeout=120) for h in handles]
        bad = [(i, p, r.text) for (p, i, e), r in zip(jobs, results) if r.text != e]
        print(f"== {spec}: {len(jobs) - len(bad)}/{len(jobs)} OK", *bad, sep="\n   ", flush=True)
    except Exception as e:
        print(f"== {spec}: ERROR {e!r}\n", shard.log()[-2500:], flush=True)
    finally:
        stop(shard)
