"""Issue 25's routing benchmark: X-LoRA gates on text domains the demo never used, with the demo's recipe ablated.

Run it with ``python -m benchmarks.routing`` (see `__main__.py` and docs/routing.md).
"""
