#!/usr/bin/env bash
# A tour of heimdall, from the old static env key to KMS envelope encryption: ingest, migrate,
# rotate, re-encrypt, look up, decrypt, audit. On the embedded default (local keyring + SQLite),
# or on Vault/OpenBao with HMD_KMS_PROVIDER=vault HMD_VAULT_ADDR=... HMD_VAULT_TOKEN=...,
# or on AWS KMS with HMD_KMS_PROVIDER=aws (after `heimdall aws bootstrap`; AWS credentials from
# the SDK's default chain). On AWS the tour's rotation creates a KMS key, which AWS bills.
# The fields go to SQLite in the data dir, or with HMD_STORE=postgres|age and HMD_POSTGRES_DSN
# (HMD_AGE_GRAPH) to an empty PostgreSQL database or Apache AGE graph.
set -euo pipefail
cd "$(dirname "$0")/.."

# Only HMD_DATA_DIR (where the tour runs), HMD_AUDIT_FSYNC, the key provider's settings
# (HMD_KMS_PROVIDER, HMD_KMS_KEY_NAME, HMD_VAULT_*, HMD_AWS_*) and the store's (HMD_STORE,
# HMD_POSTGRES_DSN, HMD_AGE_GRAPH; the tour refuses a store that holds fields already) are taken
# from the caller: any other inherited HMD_* setting (HMD_KEYRING_PATH, HMD_SQLITE_PATH,
# HMD_CONFIG, HMD_ROLE, ...) could point the tour at real data or break it.
for name in $(compgen -e); do
    case "$name" in
        HMD_DATA_DIR | HMD_AUDIT_FSYNC | HMD_KMS_PROVIDER | HMD_KMS_KEY_NAME | \
            HMD_VAULT_* | HMD_AWS_* | HMD_STORE | HMD_POSTGRES_DSN | HMD_AGE_GRAPH) ;;
        HMD_*) unset "$name" ;;
    esac
done
PROVIDER="${HMD_KMS_PROVIDER:-local}"
export HMD_DATA_DIR="${HMD_DATA_DIR:-.heimdall-demo}"
# The tour starts from an empty data dir, so it wipes it first; it only ever wipes the default
# or a directory it made itself (marked), never a real keyring and database.
MARKER="$HMD_DATA_DIR/.heimdall-demo-data"
if [ "$HMD_DATA_DIR" != .heimdall-demo ] && [ -e "$HMD_DATA_DIR" ] && [ ! -e "$MARKER" ]; then
    if [ ! -d "$HMD_DATA_DIR" ] || [ -n "$(ls -A "$HMD_DATA_DIR")" ]; then
        echo "error: $HMD_DATA_DIR is not an empty directory made by the demo;" \
            "point HMD_DATA_DIR at a new directory" >&2
        exit 1
    fi
fi
rm -rf "$HMD_DATA_DIR"
mkdir -p -m 700 "$HMD_DATA_DIR"
touch "$MARKER"
export HMD_ACTOR="demo:tour"
# Re-encryption pauses HMD_REENCRYPT_INTERVAL_SECONDS (60 by default) between batches, to stay
# under a KMS's request quotas; the tour's few thousand fields would wait a minute for nothing.
export HMD_REENCRYPT_INTERVAL_SECONDS=0
PEOPLE=examples/people.jsonl
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
head -n 120 "$PEOPLE" > "$TMP/old-system.jsonl"
tail -n +121 "$PEOPLE" > "$TMP/new-signups.jsonl"

step() { printf '\n\033[1m== %s\033[0m\n' "$1"; }
run() { printf '$ %s\n' "$*"; "$@"; }

if [ "$PROVIDER" != local ]; then
    step "0. Pre-flight: can heimdall reach and use the $PROVIDER key?"
    run heimdall kms check || echo "(a check failed; the tour goes on)"
fi

# A throwaway static master key, standing in for the env key heimdall replaces.
HMD_MASTER_KEY=$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())')
export HMD_MASTER_KEY

if [ "${HMD_STORE:-sqlite}" != sqlite ]; then
    # A database outlives the data dir: the tour starts only from an empty one.
    HELD=$(HMD_ENCRYPTION_MODE=legacy heimdall migrate status --json |
        python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["legacy_fields"] + s["kms_fields"])')
    if [ "$HELD" != 0 ]; then
        echo "error: the HMD_STORE=$HMD_STORE store already holds $HELD fields;" \
            "point HMD_POSTGRES_DSN at an empty database" >&2
        exit 1
    fi
fi

step "1. The old world: fields encrypted under the static HMD_MASTER_KEY (legacy mode)"
HMD_ENCRYPTION_MODE=legacy run heimdall ingest "$TMP/old-system.jsonl"

step "2. Hybrid mode: new fields go to the KMS ($PROVIDER), legacy fields still read"
export HMD_ENCRYPTION_MODE=hybrid
run heimdall ingest "$TMP/new-signups.jsonl"
run heimdall status

step "3. Rotate the master key: new fields use version 2, old ones still decrypt"
run heimdall keys rotate
run heimdall keys show

step "4. Re-encrypt: rewrap v1 data keys under v2, move legacy fields to the KMS"
run heimdall reencrypt
run heimdall status

step "5. KMS-only mode: the static key is no longer needed"
unset HMD_MASTER_KEY
export HMD_ENCRYPTION_MODE=kms
EMAIL=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["email"])' "$PEOPLE")
KEY=$(heimdall lookup email "$EMAIL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["canonical_key"])')
run heimdall lookup email "$EMAIL"
run heimdall decrypt "$KEY" --reason "support:ticket-4711"

step "6. The audit trail: every encrypt, decrypt and key event, hash-chained"
run heimdall audit tail -n 4
run heimdall audit verify
