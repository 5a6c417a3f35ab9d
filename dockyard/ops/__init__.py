"""Canonical ops: every model is built from these; fast backends sit behind the same calls."""
