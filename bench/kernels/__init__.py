"""Per-kernel GPU benchmarks: each module's `bench(device) -> list[dict]` times its op at real
V4-Flash shapes (rows: kernel, shape, time_us, graph_us, bytes, gbps); `python -m
bench.kernels.<op>` prints the table."""
