"""Closed sets of values that every layer may name, with no behaviour behind them.

The bottom layer beside :mod:`heimdall.errors`: it imports nothing of heimdall, so settings can
name a mode without importing the ciphers that carry it out.
"""

from __future__ import annotations

import enum

__all__ = ["EncryptionMode"]


class EncryptionMode(enum.StrEnum):
    """Which cipher writes new fields and which stored fields may be read.

    spec: Migration Strategy, Phase 3 (``HMD_ENCRYPTION_MODE=legacy|kms|hybrid``). What each
    mode reads and writes is :class:`heimdall.modes.CipherRouter`'s business.
    """

    LEGACY = "legacy"
    KMS = "kms"
    HYBRID = "hybrid"
