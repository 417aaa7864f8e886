"""The checks of `vmetal doctor`, one module per concern; `vmetal/cli/doctor.py` runs them in order and prints them."""
