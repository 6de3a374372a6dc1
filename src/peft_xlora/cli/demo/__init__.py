"""The demo: LoRA experts per text domain, an X-LoRA gate over them, and a held-out comparison with baselines."""

from .base import DemoSetupError, default_cache_dir
from .run import Demo
from .settings import REAL, TINY, DemoSettings, preset

__all__ = ["REAL", "TINY", "Demo", "DemoSettings", "DemoSetupError", "default_cache_dir", "preset"]
