"""Ensemble-step benchmark, fused op against the PyTorch reference (same as ``unite bench``; see --help)."""

import sys

from unite_ext.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
