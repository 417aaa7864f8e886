"""Helpers the test tiers share (imported as `tests.support.X`; the repository root is on pytest's path):
local hubs, fake servers, engine references, model folders."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout's root
