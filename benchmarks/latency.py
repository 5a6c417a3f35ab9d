"""The repository's entry to `dockyard bench latency` (dockyard/bench/latency.py): same flags, same output.

    python benchmarks/latency.py --help
"""

from dockyard.bench.latency import main

if __name__ == "__main__":
    main()
