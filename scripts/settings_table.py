"""Print the README's settings table from the settings classes (so the two cannot drift apart)."""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.settings import Settings  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402


def rows() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    classes: list[tuple[str, Any]] = [("api", Settings), ("worker", WorkerSettings)]
    try:
        from dispatcher.delivery import DispatcherSettings

        classes.append(("dispatcher", DispatcherSettings))
    except ImportError:
        pass
    for proc, cls in classes:
        for name, field in cls.model_fields.items():
            env = f"SDXL_{name.upper()}"
            row = table.setdefault(env, {"procs": [], "default": field.default, "doc": field.description or ""})
            row["procs"].append(proc)
            row["doc"] = row["doc"] or field.description or ""
    return table


def main() -> None:
    print("| variable | used by | default | meaning |")
    print("|---|---|---|---|")
    for env, row in sorted(rows().items()):
        default = row["default"]
        shown = "" if default is None else f"`{default}`"
        if hasattr(default, "__class__") and "PydanticUndefined" in repr(default):
            shown = "(required)"
        print(f"| `{env}` | {', '.join(row['procs'])} | {shown} | {row['doc']} |")


if __name__ == "__main__":
    main()
