"""Names every installed package whose version differs from the last tested set.

    python .ci/drift.py .ci/constraints.txt      # exit 0; prints 'no drift' or one line a package

`.ci/run --newest` calls it after the suite, so that a failure on the newest releases says which
releases moved since the versions in the constraints file last passed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def pins(path: str) -> dict[str, str]:
    """``name → version`` of every ``name==version`` line (names normalized as pip does)."""
    found = {}
    for line in open(path, encoding="utf-8"):
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


def main(path: str) -> int:
    tested = pins(path)
    installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in metadata.distributions()}
    moved = [
        f"{name} {version} -> {installed[name]}"
        for name, version in sorted(tested.items())
        if name in installed and installed[name] != version
    ]
    added = [
        f"{name} {installed[name]} (not in the tested set)"
        for name in sorted(set(installed) - set(tested))
        if name not in ("lora-monitor", "pip", "setuptools", "wheel") and not name.startswith(("torch", "nvidia-"))
    ]
    if not moved and not added:
        print(f"no drift: every package is at the version of {path}")
    else:
        print(f"drift from {path} (the last tested set):")
        for line in moved + added:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".ci/constraints.txt"))
