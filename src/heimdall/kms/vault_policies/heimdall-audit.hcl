# heimdall-audit: compliance and security review.
#
# Lists the audit devices (which exist, and where they write) and checks the MACs of
# heimdall's audit trail checkpoints with the audit key heimdall-pii-audit (verify, never hmac:
# a reviewer cannot make a checkpoint). No access to the transit key heimdall-pii at all. The
# audit log itself is read where the device writes it (file, syslog, socket), not through Vault.
#
# spec: Access Control Model, Role-Based Access (heimdall-audit: read audit logs only); Audit
# and Compliance, Vault Audit Backend Configuration.
#
# Written for the key heimdall-pii on the mount transit/; heimdall's bootstrap writes it with the
# configured key name and mount substituted (deploy/vault/README.md, "Other mounts and keys").

# Listing audit devices needs sudo; enabling or disabling one (sys/audit/<path>) is not granted.
path "sys/audit" {
  capabilities = ["read", "sudo"]
}

# The audit key heimdall-pii-audit: checks the MAC of each checkpoint of heimdall's audit trail
# (`heimdall audit verify`); the MAC key itself never leaves Vault.
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
