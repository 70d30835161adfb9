"""The one quick/full switch every notebook and benchmark shares, and device choice.

``MOR_LAB_QUICK=1`` shrinks steps and data so that every notebook runs in minutes on a 2-core CPU
(CI and nbval set it); unset, notebooks do the full-size version and use a GPU when one is present.
"""
from __future__ import annotations

import os

import torch


def is_quick() -> bool:
    return os.environ.get("MOR_LAB_QUICK", "").strip().lower() not in ("", "0", "false", "no")


def pick(quick, full):
    """``quick`` under MOR_LAB_QUICK, else ``full`` (e.g. ``pick(quick=8, full=64)`` tokens)."""
    return quick if is_quick() else full


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
