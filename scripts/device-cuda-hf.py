"""Hugging Face transformers on the same synthesized checkpoint and prompt as fpf-cuda-bench (sequence 0): prefill
time and greedy decode ms/token at batch 1, bf16, KV cache, medians of --reps after one warm-up.
Usage: python3 scripts/device-cuda-hf.py MODEL_DIR [prompt_tokens=6000] [steps=30] [reps=3]"""
import json, statistics, sys, time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

model_dir = sys.argv[1]
prompt_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 3
cfg = AutoConfig.from_pretrained(model_dir)
s, ids = 0x1234567, []
for _ in range(prompt_tokens):  # the LCG of fpf-cuda-bench, sequence 0
    s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
    ids.append((s >> 33) % min(cfg.vocab_size, 150000))
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
load_s = time.time() - t0
x = torch.tensor([ids], device="cuda")
pre, dec, toks = [], [], []
with torch.no_grad():
    for rep in range(reps + 1):
        torch.cuda.synchronize(); t0 = time.time()
        out = model(input_ids=x, use_cache=True)
        torch.cuda.synchronize(); p = time.time() - t0
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        tk = [tok.item()]
        torch.cuda.synchronize(); t0 = time.time()
        for _ in range(steps - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tk.append(tok.item())
        torch.cuda.synchronize(); d = (time.time() - t0) / max(steps - 1, 1)
        if rep > 0:
            pre.append(p * 1e3); dec.append(d * 1e3); toks = tk
        del out, past
print(json.dumps({"hf_transformers": __import__("transformers").__version__, "torch": torch.__version__,
                  "load_s": round(load_s, 1), "prefill_ms": round(statistics.median(pre), 1),
                  "decode_ms_per_token": round(statistics.median(dec), 2), "prefill_reps_ms": [round(v, 1) for v in pre],
                  "decode_reps_ms": [round(v, 2) for v in dec], "tokens": toks}))
