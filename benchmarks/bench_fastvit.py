"""FastViT before and after `reparam.fuse`: `bench_models.py` restricted to the ImageNet FastViTs.

    python benchmarks/bench_fastvit.py [--repeats N] [--threads 2] [--json OUT] ...

Takes every option of bench_models.py; `--models` overrides the default list.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_models import main  # noqa: E402

DEFAULT_VARIANTS = ["fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12", "fastvit_sa24",
                    "fastvit_sa36", "fastvit_ma36"]

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if "--models" in argv else ["--models", *DEFAULT_VARIANTS, *argv]))
