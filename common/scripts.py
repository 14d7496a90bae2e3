"""The Redis scripts: one `.lua` file each in common/lua/, read by this one loader.

A script names the key names it builds itself through `KEY` (`KEY.generation(id)`, `KEY.pending(owner)`,
`KEY.STATS`, ...), a table the loader writes from common/contract/keys.py, so every key name is defined once,
there. A first line `-- uses: a, b` makes scripts `a` and `b` local functions of this one (their KEYS and ARGV
become parameters), so several steps run as one atomic script.

Keys built inside a script are not declared in KEYS: fine on one Redis, not on Redis Cluster.
"""

import re
from functools import cache
from pathlib import Path
from typing import Any

from common.contract import keys

LUA_DIR = Path(__file__).with_name("lua")
_USES = re.compile(r"^-- uses: (.+)$", re.MULTILINE)
_MARK = "\x00"  # stands for the argument when a key function's template is read


def _key_table() -> str:
    """`KEY` for the scripts, from keys.py: its functions of one id and its constant names."""
    lines = ["local KEY = {}"]
    for name in ("generation", "pending", "lease", "events", "owner_index", "active"):
        head, _, tail = getattr(keys, name)(_MARK).partition(_MARK)
        lines.append(f"function KEY.{name}(x) return '{head}' .. x .. '{tail}' end")
    for name in ("usage_day",):  # functions of two ids
        head, _, rest = getattr(keys, name)(_MARK, _MARK).partition(_MARK)
        mid, _, tail = rest.partition(_MARK)
        lines.append(f"function KEY.{name}(x, y) return '{head}' .. x .. '{mid}' .. y .. '{tail}' end")
    for name in ("STATS", "RUNNING", "ACTIVE_OWNERS", "USAGE_IMAGES", "USAGE_GPU_US"):
        lines.append(f"KEY.{name} = '{getattr(keys, name)}'")
    return "\n".join(lines) + "\n"


def _body(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def _uses(name: str) -> list[str]:
    """Every script `name` uses, directly or not, each before its users."""
    order: list[str] = []

    def visit(n: str) -> None:
        m = _USES.search(_body(n))
        for dep in [d.strip() for d in m.group(1).split(",")] if m else []:
            if dep not in order:
                visit(dep)
                order.append(dep)

    visit(name)
    return order


@cache
def source(name: str) -> str:
    """The text sent to Redis for script `name`."""
    funcs = "".join(f"local function {dep}(KEYS, ARGV)\n{_body(dep)}end\n" for dep in _uses(name))
    return _key_table() + funcs + _body(name)


def register(client: Any, name: str) -> Any:
    """`client.register_script` for script `name` (a sync or asyncio redis-py client)."""
    return client.register_script(source(name))
