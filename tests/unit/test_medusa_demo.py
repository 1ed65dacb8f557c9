"""The demo's Medusa heads (scripts/make_demo_model.py): v2, loadable as the speculator, and drafting the
demo's training texts: head i's argmax at position t is the text's token t+i+2."""

from __future__ import annotations

import os

import torch

from make_demo_model import BASE_TEXTS, MEDUSA_HEADS
from medusa_helpers import forward_spec
from worker.adapters.medusa import load_speculator
from worker.models.qwen import FlashQwenForCausalLM
from worker.tokenizer import QwenTokenizer


def test_demo_heads_draft_the_training_texts(demo_dir):
    model_dir, root = os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters")
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    ckpt = load_speculator(root, "medusa", model.config)
    assert (ckpt.version, ckpt.num_heads) == (2, MEDUSA_HEADS)
    model.attach_medusa(ckpt)
    tok = QwenTokenizer.from_dir(model_dir)
    hits, total = torch.zeros(MEDUSA_HEADS), torch.zeros(MEDUSA_HEADS)
    for prompt, continuation in BASE_TEXTS:
        seq = tok.encode(prompt + continuation) + [tok.endoftext_id]
        _, spec = forward_spec(model, [seq])
        drafts = spec.argmax(-1)  # [T, K]
        for i in range(MEDUSA_HEADS):
            n = len(seq) - i - 2
            hits[i] += (drafts[:n, i] == torch.tensor(seq[i + 2 :])).sum()
            total[i] += n
    accuracy = hits / total
    assert (accuracy >= 0.9).all(), accuracy
