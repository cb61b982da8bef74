"""Rebuild the shipped sample: ``python -m sage_jax.data.sample DATA_DIR [OUT_DIR]``."""

import sys

from sage_jax.data.sample import SAMPLE_DIR, build_sample

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m sage_jax.data.sample DATA_DIR [OUT_DIR]")
    for name, path in build_sample(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else SAMPLE_DIR).items():
        print(f"{name}: {path.stat().st_size} bytes -> {path}")
