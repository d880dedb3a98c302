"""Small, self-contained user code for the demo, the example DAG and the tests.

Real torch models built in code from a fixed seed (no downloaded weights), so every try of a
shard produces the same predictions.
"""
