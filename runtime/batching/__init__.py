"""Continuous batching: a KV pool with a row per request, and the scheduler that steps them together."""
