"""Executors: they run a step over its input blocks and write its parts (`local`; `ray_executor`
with its `ray_workers`, on a Ray cluster)."""
