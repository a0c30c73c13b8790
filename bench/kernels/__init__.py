"""Per-kernel GPU benchmarks: each module has `bench(device) -> list[dict]` rows
{kernel, shape, time_us, bytes, gbps} at the real V4-Flash shapes, and a `__main__` table."""
