# heimdall-app: the Heimdall application instances (API, ingest, CLI in normal use).
#
# Gets fresh data keys from the transit key heimdall-pii (datakey), unwraps them again
# (decrypt), encrypts small values directly (encrypt) and reads the key's metadata: versions
# and the decryption floor; makes the MACs of heimdall's audit trail checkpoints with the audit
# key heimdall-pii-audit (hmac). It cannot rotate or reconfigure the key, rewrap, export, back
# up or trim either key, nor verify audit MACs.
#
# spec: Access Control Model, Vault Policy Example and Role-Based Access (heimdall-app:
# encrypt, decrypt, read key metadata); datakey is the Alternative Pattern of KMS Provider
# Evaluation, HashiCorp Vault.
#
# Written for the key heimdall-pii on the mount transit/; heimdall's bootstrap writes it with the
# configured key name and mount substituted (deploy/vault/README.md, "Other mounts and keys").

path "transit/encrypt/heimdall-pii" {
  capabilities = ["update"]
}

path "transit/decrypt/heimdall-pii" {
  capabilities = ["update"]
}

# Both forms: plaintext returns the data key to wrap fields locally, wrapped returns only the
# wrapped key (for pre-provisioning without seeing the key).
path "transit/datakey/plaintext/heimdall-pii" {
  capabilities = ["update"]
}

path "transit/datakey/wrapped/heimdall-pii" {
  capabilities = ["update"]
}

path "transit/keys/heimdall-pii" {
  capabilities = ["read"]
}

# The audit key heimdall-pii-audit: a MAC over each checkpoint of heimdall's audit trail, which
# every process that writes audit events makes (spec: Audit Log Requirements). hmac only, with
# the algorithm in the request body; the MAC key itself never leaves Vault.
path "transit/hmac/heimdall-pii-audit" {
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
