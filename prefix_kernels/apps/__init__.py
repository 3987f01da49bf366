"""Applications built on the library's public API: the demo (`python -m prefix_kernels.apps.demo`), the
`prefix-kernels` command line, and the peak-memory meter the demo, the example and the benchmarks share."""
