"""The repository's entry to `dockyard bench throughput` (dockyard/bench/throughput.py): same flags, same output.

    python benchmarks/throughput.py --help
"""

from dockyard.bench.throughput import main

if __name__ == "__main__":
    main()
