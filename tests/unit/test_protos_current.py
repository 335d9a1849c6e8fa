"""The committed gRPC modules must be exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_match_proto_sources(tmp_path: Path) -> None:
    """Regenerating from protos/ reproduces switchyard/api/v1 byte for byte (run `make protos`).

    protoc runs in a child process: in-process it shares the address space with whatever the
    suite imported before (vLLM, torch, grpc), and its C++ runtime has crashed there.
    """
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "switchyard" / "api" / "v1"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in committed.iterdir() if p.suffix in {".py", ".pyi"}), (
        "generated file set differs from switchyard/api/v1; run `make protos`"
    )
    for name in generated:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"switchyard/api/v1/{name} is out of date with protos/; run `make protos`"
        )
