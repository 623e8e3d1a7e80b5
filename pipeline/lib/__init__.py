"""Shared code of the stages and tools, one place per concern."""
