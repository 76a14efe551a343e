"""specbound: calibration, data and the command line (installed as one namespace)."""
