"""Parallel training: the dp x tp x pp mesh, data-parallel gradient sync, tensor-parallel
layers and pipeline schedules. See docs/architecture.md."""
