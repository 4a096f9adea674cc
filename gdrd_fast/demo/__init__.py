"""The offline demo (`gdrd-fast demo`): GDRD vs a baseline and CRD at 16x16 on synthetic or real faces."""
from .config import DemoConfig, load_demo_config
from .run import run_demo

__all__ = ["DemoConfig", "load_demo_config", "run_demo"]
