#!/usr/bin/env python3
"""Same as ``splitserve bench serve``: python bench/serve.py --target HOST:PORT ..."""
import sys

from splitserve.bench.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
