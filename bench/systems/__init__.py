"""One module per benchmarked system; each runs as ``python -m bench.systems.NAME CONFIG_JSON``
in a fresh process, so that its threads, memory and process tree are its own."""
