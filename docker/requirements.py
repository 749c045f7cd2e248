"""Print the requirements of some of pyproject.toml's extras, for the images' builder stages.

    python docker/requirements.py control-plane --without nvidia-pytriton

Self-references (``sfumato[serving]``) are followed; ``--without`` drops packages an image does
not need (the control-plane image talks to Triton over gRPC: it needs ``tritonclient``, not the
``tritonserver`` binary that ``nvidia-pytriton`` ships). The extras stay declared once, in
pyproject.toml.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(extras: list[str], *, without: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project["optional-dependencies"]
    seen_extras: set[str] = set()
    found: list[str] = list(project["dependencies"])

    def walk(extra: str) -> None:
        if extra in seen_extras:
            return
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        seen_extras.add(extra)
        for requirement in optional[extra]:
            if requirement_name(requirement) == project["name"]:
                inner = re.search(r"\[(.*)\]", requirement)
                for name in inner.group(1).split(",") if inner else []:
                    walk(name.strip())
            else:
                found.append(requirement)

    for extra in extras:
        walk(extra)
    drop = {name.lower() for name in without}
    unique: dict[str, str] = {}
    for requirement in found:
        name = requirement_name(requirement)
        if name not in drop:
            unique.setdefault(requirement.split("#")[0].strip(), name)
    return sorted(unique)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="+")
    parser.add_argument("--without", action="append", default=[], metavar="PACKAGE")
    args = parser.parse_args()
    sys.stdout.write("".join(f"{line}\n" for line in requirements(args.extras, without=set(args.without))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
