"""Execution engine: turns a Plan into a real training run."""
