"""Field encryption: one envelope format, two ways to fill it, one interface.

spec: Envelope Encryption Architecture; KMS Provider Evaluation, HashiCorp Vault (both patterns).

=====================  ============================================================
``base.Cipher``        the interface the rest of heimdall calls (encrypt, decrypt, rewrap
                       and their batches, forget_keys, kms, encryption_version, kms_calls)
``EnvelopeCipher``     pattern A: data keys from the provider, cached; values encrypted here
                       with AES-256-GCM (:mod:`heimdall.cipher.envelope`)
``DirectCipher``       pattern B, ``KMS-DIRECT``: the provider encrypts each value itself
                       (:mod:`heimdall.cipher.direct`)
``FieldCipher``        what heimdall builds: writes with one of them, reads and rewraps each
                       envelope with the one that wrote it (:mod:`heimdall.cipher.field`)
=====================  ============================================================
"""

from heimdall.cipher.base import Cipher, SealedField
from heimdall.cipher.direct import DirectCipher, DirectProvider
from heimdall.cipher.envelope import CachePolicy, EnvelopeCipher
from heimdall.cipher.field import FieldCipher

__all__ = [
    "CachePolicy",
    "Cipher",
    "DirectCipher",
    "DirectProvider",
    "EnvelopeCipher",
    "FieldCipher",
    "SealedField",
]
