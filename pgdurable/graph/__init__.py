"""The workflow graph: node model, compilation to flat arrays, and the scheduler twins."""
