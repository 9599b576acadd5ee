# heimdall-admin: key lifecycle management (operators and the re-encryption job).
#
# Rotates the transit key heimdall-pii, reads and changes its configuration (the decryption
# floor, deletion_allowed when a key is retired), reads its metadata, rewraps data keys under
# the newest version after a rotation (rewrap never reveals a plaintext) and lists the audit
# devices to verify one is enabled. It makes and checks the MACs of heimdall's audit trail
# checkpoints with the audit key heimdall-pii-audit (hmac, verify). It cannot encrypt, decrypt
# or get data keys, so it never sees a plaintext field or data key; nor can it export, back up
# or trim either key.
#
# spec: Access Control Model, Vault Policy Example ("Admin policy for key rotation") and
# Role-Based Access (heimdall-admin: rotate keys, update policies, audit log access); Key
# Rotation Strategy; Operational Runbooks, Routine Key Rotation and Emergency Key Compromise
# Response; Audit and Compliance, Vault Audit Backend Configuration.
#
# Written for the key heimdall-pii on the mount transit/; heimdall's bootstrap writes it with the
# configured key name and mount substituted (deploy/vault/README.md, "Other mounts and keys").

path "transit/keys/heimdall-pii/rotate" {
  capabilities = ["update"]
}

# exportable and allow_plaintext_backup can only ever be switched on, never off again, and
# would make the key material extractable: refused here even though export and backup are
# also denied below.
path "transit/keys/heimdall-pii/config" {
  capabilities = ["read", "update"]
  denied_parameters = {
    "exportable"             = []
    "allow_plaintext_backup" = []
  }
}

path "transit/keys/heimdall-pii" {
  capabilities = ["read"]
}

path "transit/rewrap/heimdall-pii" {
  capabilities = ["update"]
}

# Listing audit devices needs sudo; enabling or disabling one (sys/audit/<path>) is not granted.
path "sys/audit" {
  capabilities = ["read", "sudo"]
}

# The audit key heimdall-pii-audit: a MAC over each checkpoint of heimdall's audit trail (every
# command writes audit events) and the check of those MACs (`heimdall audit verify`), with the
# algorithm in the request body; the MAC key itself never leaves Vault. spec: Audit Log
# Requirements.
path "transit/hmac/heimdall-pii-audit" {
  capabilities = ["update"]
}

path "transit/verify/heimdall-pii-audit" {
  capabilities = ["update"]
}

# Key material never leaves Vault (no export, no plaintext backup) and old versions are never
# trimmed away (that would strand stored fields). spec: Access Control Model ("Deny direct
# access to key material"). Across a token's policies Vault applies only the most specific
# matching path (merging capabilities where several policies name that same path), so a glob
# deny yields to a more specific grant elsewhere: the key's own paths are denied exactly too,
# and there a deny wins over a grant from any other policy on the same token.
path "transit/export/*" {
  capabilities = ["deny"]
}

path "transit/export/encryption-key/heimdall-pii" {
  capabilities = ["deny"]
}

path "transit/export/encryption-key/heimdall-pii/*" {
  capabilities = ["deny"]
}

path "transit/export/hmac-key/heimdall-pii" {
  capabilities = ["deny"]
}

path "transit/export/hmac-key/heimdall-pii/*" {
  capabilities = ["deny"]
}

path "transit/backup/*" {
  capabilities = ["deny"]
}

path "transit/backup/heimdall-pii" {
  capabilities = ["deny"]
}

path "transit/keys/heimdall-pii/trim" {
  capabilities = ["deny"]
}

# The same for the audit key heimdall-pii-audit (created type hmac, not exportable).
path "transit/export/encryption-key/heimdall-pii-audit" {
  capabilities = ["deny"]
}

path "transit/export/encryption-key/heimdall-pii-audit/*" {
  capabilities = ["deny"]
}

path "transit/export/hmac-key/heimdall-pii-audit" {
  capabilities = ["deny"]
}

path "transit/export/hmac-key/heimdall-pii-audit/*" {
  capabilities = ["deny"]
}

path "transit/backup/heimdall-pii-audit" {
  capabilities = ["deny"]
}

path "transit/keys/heimdall-pii-audit/trim" {
  capabilities = ["deny"]
}
