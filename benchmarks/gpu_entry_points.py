"""Run conceptlib and its plugins from the source tree where they are not pip-installed (the GPU
machine): source folders for sys.path / PYTHONPATH, plus a generated ``.dist-info`` folder that
registers their entry points (trainers, template packs), so plugin discovery works unchanged.

    python3 benchmarks/gpu_entry_points.py /tmp/conceptlib-ep   # prints a PYTHONPATH to prepend

Distributions that ARE installed are left alone (registering them twice would make discovery
report a name clash).
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _projects() -> list[Path]:
    return [ROOT] + sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def source_paths(folder: Path) -> list[str]:
    """The folders to put first on sys.path: the project root, each plugin's folder, and
    ``folder`` holding the generated entry points of the distributions not installed."""
    import tomllib

    paths: list[str] = []
    lines: list[str] = []
    for project in _projects():
        data = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        try:
            metadata.distribution(data["name"])
            continue  # installed: its own entry points are already visible
        except metadata.PackageNotFoundError:
            pass
        paths.append(str(project))
        for group, entries in data.get("entry-points", {}).items():
            lines.append(f"[{group}]")
            lines.extend(f"{name} = {value}" for name, value in entries.items())
            lines.append("")
    if lines:
        info = Path(folder) / "conceptlib_source_tree-0.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: conceptlib-source-tree\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text("\n".join(lines))
        paths.append(str(folder))
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/conceptlib-ep")
    print(os.pathsep.join(source_paths(target)))
