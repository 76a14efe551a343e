"""The weight products of one decoder layer and the LM head, SmolLM2's shapes, timed alone per kernel.

F.linear (MKL), torch.mv, and oneDNN's linear on a weight prepacked once (what kernels.py uses),
for 1 and 4 rows. Thirty copies of each layer weight are cycled, so that each product reads its
weight from memory, as a pass over 30 layers does, not from the 32 MB L3. Prints ms per product
and the read rate it implies. Usage: .venv/bin/python experiments/gemv_kernels.py (about a minute).
"""

import torch, time, statistics
import torch.nn.functional as F
torch.manual_seed(0)
shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
def t(fn, reps=200):
    for _ in range(10): fn()
    s = []
    for _ in range(reps):
        a = time.perf_counter(); fn(); s.append(time.perf_counter() - a)
    return statistics.median(s) * 1e3
# several copies of each weight so that a pass reads from memory, not L3 (30 layers)
for name, (o, i) in shapes.items():
    copies = 30 if name != "head" else 1
    W = [torch.randn(o, i) for _ in range(copies)]
    P = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in W]
    for rows in (1, 4):
        x = torch.randn(rows, i)
        lin = t(lambda: [F.linear(x, w) for w in W]) / copies
        pk = t(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in P]) / copies
        mv = t(lambda: [torch.mv(w, x[0]) for w in W]) / copies if rows == 1 else float("nan")
        mb = o * i * 4 / 1e6
        print(f"{name:8s} rows={rows} MB={mb:6.2f}  F.linear {lin:.3f} ms ({mb/lin:.1f} GB/s)  onednn {pk:.3f} ({mb/pk:.1f})  mv {mv:.3f} ({mb/mv:.1f})")
