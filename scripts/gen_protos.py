"""Generate the Python modules in ``switchyard/api/v1`` from ``protos/switchyard/v1/*.proto``.

Run ``python scripts/gen_protos.py`` after editing a .proto; ``tests/unit/test_protos_current.py``
fails while the committed modules differ from what this script produces. protoc names modules
after the proto package (``switchyard.v1``); they live under ``switchyard.api.v1`` so the
generated code never mixes with hand-written modules, hence the import rewrite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = ROOT / "switchyard" / "api" / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir`` and return their paths."""
    from grpc_tools import protoc

    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "switchyard" / "v1").glob("*.proto")
    )
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "switchyard" / "v1").iterdir()):
            text = src.read_text().replace("from switchyard.v1 import", "from switchyard.api.v1 import")
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text(
            '"""Generated from protos/switchyard/v1 by scripts/gen_protos.py; never edit by hand."""\n'
        )
        written.append(init)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    args = parser.parse_args()
    if args.out == PACKAGE_DIR and PACKAGE_DIR.exists():
        shutil.rmtree(PACKAGE_DIR)
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path, file=sys.stderr)


if __name__ == "__main__":
    main()
