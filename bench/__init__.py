"""`specbound bench`: every decoding method on the same prompts, interleaved, timed on this machine.

Methods (`methods.METHODS`), each on the same chat-templated prompts with the same token budget:

| method | what runs |
| --- | --- |
| hf-greedy | `model.generate(do_sample=False)`: the reference for speed and for tokens (always runs; greedy benches) |
| hf-greedy-compiled | `generate(do_sample=False)` under transformers' static cache and `torch.compile` recipe, on a second copy of the model; its warm-up is reported apart (`compiled`; greedy benches) |
| ort-genai | ONNX Runtime GenAI's greedy decoding on its own fp32 CPU export of the checkpoint (optional `peers` extra; skipped with a warning without it; greedy benches) |
| ort-genai-ngram | the same with its n-gram speculation (`ngram_size=3`) |
| hf-sample | `model.generate(do_sample=True, ...)`: the reference of a sampling bench (`--temperature`, ...) |
| ar | our engine without speculation (`Decoder.generate(speculation=False)`) |
| hf-prompt-lookup | transformers `generate(prompt_lookup_num_tokens=k)`, k in `PROMPT_LOOKUP_GRID` |
| hf-early-exit | transformers `generate(assistant_early_exit=layer)`, layer from `early_exit_layers` |
| specbound-paper | our runtime with the paper's default schedule (no artifact) |
| specbound | our runtime with the calibrated `--artifact` (skipped, with a warning, without one) |
| oracle | not run: the simulator's bound for the artifact's drafts with every exit decided perfectly (greedy only) |
| limit | not run: the simulated speed if every draft were free and right at the artifact's w_max, the cost of verification alone (greedy only) |

Under sampling every method samples with the same settings and, answer by answer, the same seed;
exactness is replaced by a distribution check (`distribution`).

Modules, by job:

| module | job |
| --- | --- |
| `answers` | which answers a bench generates (task prompts, MT-Bench's two turns) |
| `methods` | the methods and how each generates an answer (`MethodRunner`) |
| `compiled` | the hf-greedy-compiled reference: the recipe, its copy of the model, its warm-up |
| `peers` | runtimes a user might pick instead (ONNX Runtime GenAI): the export, its cache and the skip line |
| `hf_hooks` | counting transformers' verification passes from outside `generate()` |
| `measurements` | the append-only measurement log that lets a bench resume |
| `harness` | `run_bench`: options, interleaved timing, resuming, assembling results |
| `summary` | the reported figures (tokens/s, speedup, accepted length, exactness, token sources, worst task) |
| `distribution` | a sampling bench's check that each method's tokens are samples of the model |
| `oracle` | the simulated oracle and limit rows; the only module that needs the calibration code |
| `report` | table.md, results.json, speedup.png, Spec-Bench-style <method>.jsonl |
"""
