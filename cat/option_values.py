"""What a value of an option may be, checked before any work starts: its type (a YAML file gives
exactly what it says: ``"false"`` is a string and ``2.9`` a float, neither is converted), for a
number its range (:class:`Bounds`), and the strict YAML loader the config and manifest files are
read with (:func:`strict_loader`). Functions here say what is wrong; cat/config.py raises.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass

FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric option: from ``low`` (exclusive with ``above``) to ``high``, both
    optional; a float must also be finite in float32, the precision the engine computes in."""

    low: float | None = None
    high: float | None = None
    above: bool = False  # strictly greater than ``low``
    why: str = ""  # said after the range in the message

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (``must be ... , got ...``), or ``None``."""
        if value is None:
            return None
        finite = _is_int(value) or (math.isfinite(value) and abs(value) <= FLOAT32_MAX)
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        if finite and low_ok and (self.high is None or value <= self.high):
            return None
        parts = [] if self.low is None else [f"{'>' if self.above else '>='} {self.low:g}"]
        parts += [] if self.high is None else [f"<= {self.high:g}" if self.high < 1e6 else f"<= {self.high}"]
        why = f" ({self.why})" if self.why else ""
        kind = "" if _is_int(value) else "a finite number "
        return f"must be {kind}{' and '.join(parts)}{why}, got {value!r}"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# kind -> (does a value have it, the value as that kind, what the message calls it)
TYPES = {
    "int": (_is_int, int, "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), float, "a number"),
    "bool": (lambda v: isinstance(v, bool), bool, "true or false"),
    "str": (lambda v: isinstance(v, (str, os.PathLike)), os.fspath, "a string"),
    "list[str]": (
        lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
        lambda v: v if isinstance(v, str) else list(v),
        "a list of names (or one comma-separated string)",
    ),
    "list[dict]": (lambda v: isinstance(v, list), list, "a list of mappings"),
}


def type_problem(kind: str, value) -> str | None:
    """Why ``value`` is not of the option type ``kind`` (``expected ..., got ...``), or ``None``."""
    check = TYPES.get(kind.removesuffix(" | None"))
    if value is None or check is None or check[0](value):
        return None
    quoted = isinstance(value, str) and _unquoted_fits(kind.removesuffix(" | None"), value)
    return f"expected {check[2]}, got {value!r}" + (" (a string: write it without quotes)" if quoted else "")


def _unquoted_fits(kind: str, text: str) -> bool:
    """Whether ``text`` written without quotes would have been a value of ``kind``."""
    if kind == "bool":
        return text.lower() in ("true", "false")
    if kind == "int":
        return text.strip().lstrip("+-").isdigit()
    if kind == "float":
        try:
            float(text)
            return True
        except ValueError:
            return False
    return False


class DuplicateKey(Exception):
    """A mapping of a YAML file repeats a key."""


def strict_loader():
    """A ``yaml.SafeLoader`` that refuses repeated keys, reads only ``true``/``false`` as booleans
    (YAML 1.1 also takes ``yes``, ``no``, ``on``, ``off``: a token ``no`` would become False) and reads
    ``1e-4`` as a number (YAML 1.2; YAML 1.1 wants ``1.0e-4`` and gives the string otherwise)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if repeated:
                    raise DuplicateKey(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
            return super().construct_mapping(node, deep)

    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
    StrictLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    StrictLoader.add_implicit_resolver(
        bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    StrictLoader.add_implicit_resolver(
        float_tag,
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return StrictLoader
