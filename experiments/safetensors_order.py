"""Why the artifact's writer is our own: safetensors' `save` writes the metadata map in an order
that changes from process to process, so the same tensors and metadata give other bytes. Runs the
same save in RUNS fresh processes and prints each file's sha256 (one value: deterministic).

    .venv/bin/python experiments/safetensors_order.py [RUNS=3]
"""

from __future__ import annotations

import subprocess
import sys

ONE_SAVE = (
    "import hashlib, torch; from safetensors.torch import save; "
    "b = save({'a': torch.zeros(2), 'b': torch.ones(3)}, metadata={k: str(i) for i, k in enumerate('qwertyuiopasdfgh')}); "
    "print(hashlib.sha256(b).hexdigest()[:8])"
)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    digests = [subprocess.run([sys.executable, "-c", ONE_SAVE], capture_output=True, text=True, check=True).stdout.strip() for _ in range(runs)]
    print(" ".join(digests), f"({len(set(digests))} distinct of {runs})")


if __name__ == "__main__":
    main()
