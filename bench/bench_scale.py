"""Scale-out benchmark on local agents: same as ``lambdascale bench scale`` (flags identical).

    .venv/bin/python bench/bench_scale.py --nodes 6 --sources 2 --link-gbps 1 --model synthetic:smollm2-135m --layers 4
"""

from __future__ import annotations

import sys

from lambdascale.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "scale", *sys.argv[1:]]))
