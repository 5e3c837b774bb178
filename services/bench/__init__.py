"""Harness, not product: the chaos suite and the queue benchmarks (`make chaos`, `make bench`), each a private
stack of its own. Nothing of the product imports this room."""
