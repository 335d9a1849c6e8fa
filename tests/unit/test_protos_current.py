"""The committed gRPC modules must be exactly what the .proto files generate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> object:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_proto_sources(tmp_path: Path) -> None:
    """Regenerating from protos/ reproduces switchyard/api/v1 byte for byte (run `make protos`)."""
    gen = _load_generator()
    written = gen.generate(tmp_path)  # type: ignore[attr-defined]
    committed = ROOT / "switchyard" / "api" / "v1"
    names = sorted(p.name for p in written)
    assert names == sorted(
        p.name for p in committed.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"}
    ), "generated file set differs from switchyard/api/v1; run `make protos`"
    for path in written:
        assert path.read_text() == (committed / path.name).read_text(), (
            f"switchyard/api/v1/{path.name} is out of date with protos/; run `make protos`"
        )
