"""The local keyring on a full disk: a write that cannot be finished leaves it as it was.

The keyring file holds every master key version, so a truncated file is every stored field
lost. The child process runs under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so
write() comes back short and then fails with EFBIG, as on a full disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from heimdall.kms.local import LocalKeyring

ROTATE_UNDER_A_SIZE_LIMIT = """
import resource, signal, sys
from pathlib import Path
from heimdall.errors import KmsUnavailable
from heimdall.kms.local import LocalKeyring

keyring = LocalKeyring(Path(sys.argv[1]), create=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    keyring.rotate()
except KmsUnavailable as exc:
    print(f"refused: {exc}")
"""


def test_a_rotation_that_cannot_be_written_leaves_the_keyring_whole(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keyring.json"
    keyring = LocalKeyring(path)
    for _ in range(8):
        keyring.rotate()
    before = path.read_bytes()

    # Room for most of the new keyring, not all of it: the write comes back short.
    result = subprocess.run(
        [sys.executable, "-c", ROTATE_UNDER_A_SIZE_LIMIT, str(path), str(len(before) - 100)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"refused: keyring file {path} cannot be written")
    assert "it was left as it was" in result.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["keyring.json", "keyring.json.lock"]
    assert LocalKeyring(path).describe().latest_version == 9
