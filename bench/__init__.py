"""Benchmarks of aurora-pet: cost (time, memory, file size) and learning efficiency. See BENCHMARKS.md."""
