"""Batched generation over depth plans, and the trace it records."""
