"""FLAME head model: loader (no chumpy), LBS primitives, FLAME layer and parameter server."""
from lib.flame.flame import FLAME, FlameOutput
from lib.flame.frames import FlameFrames
from lib.flame.loader import FlameModelError, load_flame_model
from lib.flame.server import FLAMEServer

__all__ = ["FLAME", "FLAMEServer", "load_flame_model", "FlameModelError", "FlameOutput",
           "FlameFrames"]
