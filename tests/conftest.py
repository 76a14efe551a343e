import os
import sys

# tests/ holds shared helpers (tiny_models, helpers); make them importable as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
