"""Executors: they run a step over its input blocks and write its parts (`local`)."""
