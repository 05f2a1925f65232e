"""`make charm`: build vm-host_<arch>.charm with charmcraft's own pack, on this (non-Ubuntu) machine.

charmcraft refuses a destructive-mode build whose host is not the charm's base (Ubuntu 24.04): its
build plan check compares /etc/os-release with `base:`. Everything else is charmcraft's own code,
run unchanged: craft-parts with the charm plugin and charm builder (requirements lock, binary
packages, dispatch and hooks, .jujuignore), manifest.yaml, the linters and the zip. This script lifts
that one check and nothing else. The result runs on this machine's Python; to deploy on Ubuntu, run
`charmcraft pack` there (README: "Packing").

Run it with the Python of scripts/charmcraft-venv.sh: `pack-charm.py PROJECT_DIR BUILD_DIR OUT_DIR`.
The project's files (git's view: tracked and untracked-but-not-ignored) are copied into BUILD_DIR,
which is kept between runs so charmcraft reuses its dependency venv while requirements.txt is unchanged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def sync_sources(project: Path, build: Path) -> None:
    """BUILD_DIR mirrors the project's files exactly (charmcraft's parts/, stage/, prime/ stay)."""
    listed = subprocess.run(
        ["git", "-C", str(project), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    files = {Path(p.decode()) for p in listed if p and (project / p.decode()).is_file()}
    keep = {"parts", "stage", "prime", ".charmcraft"}
    build.mkdir(parents=True, exist_ok=True)
    for path in sorted(build.rglob("*"), reverse=True):
        rel = path.relative_to(build)
        if rel.parts[0] in keep or rel.suffix == ".charm":
            continue
        if path.is_file() or path.is_symlink():
            if rel not in files:
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for rel in sorted(files):
        src, dst = project / rel, build / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_bytes() != src.read_bytes() or dst.stat().st_mode != src.stat().st_mode:
            shutil.copy2(src, dst)


def main() -> int:
    project, build, out = (Path(a).resolve() for a in sys.argv[1:4])
    sync_sources(project, build)
    import craft_application.services.lifecycle as lifecycle

    lifecycle.LifecycleService._validate_build_plan = lambda self: None  # the one check lifted (see above)
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # uv, from this venv
    from charmcraft.application.main import main as charmcraft_main

    for old in build.glob("*.charm"):
        old.unlink()
    os.chdir(build)
    sys.argv = ["charmcraft", "pack", "--destructive-mode", *sys.argv[4:]]
    rc = charmcraft_main()
    if rc:
        return rc
    out.mkdir(parents=True, exist_ok=True)
    for artefact in build.glob("*.charm"):
        shutil.copy2(artefact, out / artefact.name)
        print(out / artefact.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
