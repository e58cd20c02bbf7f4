"""Benchmarks and diagnostics of the library, run from the repository root as ``python -m bench.NAME`` (not part
of the installed package). What they share (process-tree memory, repeated timing, the default study's cases) is
in bench.harness; toy data in bench.toy_data; the generator probes are subcommands of bench.diagnose."""
