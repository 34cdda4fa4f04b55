"""FLAME head model: loader (no chumpy), LBS primitives, FLAME layer and parameter server."""
from .flame import FLAME, FlameOutput
from .frames import FlameFrames
from .loader import FlameModelError, load_flame_model
from .server import FLAMEServer

__all__ = ["FLAME", "FLAMEServer", "load_flame_model", "FlameModelError", "FlameOutput", "FlameFrames"]
