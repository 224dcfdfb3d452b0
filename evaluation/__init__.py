"""Tasks, evaluation harness and the built-in model zoo recipe (imports stay lazy: torch loads on use)."""
