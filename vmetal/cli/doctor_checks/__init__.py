"""Checks of `vmetal doctor` that live outside `vmetal/cli/doctor.py` (one concern per module)."""
