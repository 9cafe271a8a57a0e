"""Go's ``fmt.Sprintf`` for the ``printf`` of model templates (corral/modelstore/gotemplate.py), never Python's format
mini-language.

A TEMPLATE's ``{{ printf "{:>5000000}" .Prompt }}`` used to go through ``str.format`` and build a 5 MB prompt;
Go prints that text as it stands, since ``{`` means nothing to it.  Supported here: the verbs Ollama's library
templates use (``%v %s %d %q %t %%``), the flags ``-``, ``+``, ``0`` and space, widths and precisions.  What Go
reports in the output, this reports the same way: ``%!d(string=x)`` for a verb that does not fit its value,
``%!s(MISSING)`` for a missing value, ``%!(EXTRA string=a)`` for values left over, ``%!(NOVERB)`` for a ``%``
at the end.  Unlike Go, a width or precision above :data:`MAX_WIDTH` prints ``%!(BADWIDTH)`` or ``%!(BADPREC)``
(Go pads up to a million columns), so a template cannot make a prompt large with one action; other verbs
(``%x``, ``%f``, ...) print as a bad verb does.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

MAX_WIDTH = 1000
_SPEC = re.compile(r"%([-+# 0]*)(\d*)(?:\.(\d*))?(.?)", re.S)


def sprintf(fmt: str, args: list[Any]) -> str:
    out: list[str] = []
    pos = n = 0
    for m in _SPEC.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        flags, width, precision, verb = m.groups()
        if verb == "%":
            out.append("%")
            continue
        if not verb:
            out.append("%!(NOVERB)")
            continue
        if len(width) > 6 or (width and int(width) > MAX_WIDTH):
            out.append("%!(BADWIDTH)")
            n += 1
            continue
        if precision is not None and (len(precision) > 6 or (precision and int(precision) > MAX_WIDTH)):
            out.append("%!(BADPREC)")
            n += 1
            continue
        if n >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        value, n = args[n], n + 1
        prec = int(precision) if precision else (0 if precision is not None else None)
        text = _verb(verb, value, flags, prec)
        if text is None:
            out.append(f"%!{verb}({_typed(value)})")
            continue
        out.append(_pad(text, int(width) if width else 0, flags, numeric=verb == "d"))
    out.append(fmt[pos:])
    if n < len(args):
        out.append("%!(EXTRA " + ", ".join(_typed(a) for a in args[n:]) + ")")
    return "".join(out)


def _verb(verb: str, value: Any, flags: str, prec: int | None) -> str | None:
    """One value under one verb, unpadded; None when the verb does not fit the value (Go's bad verb)."""
    if verb == "v":
        return _cut(value_text(value), prec) if isinstance(value, str) else value_text(value)
    if verb == "s":
        return _cut(value, prec) if isinstance(value, str) else None
    if verb == "q":
        if isinstance(value, str):
            return json.dumps(_cut(value, prec), ensure_ascii=False)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0x10FFFF:
            return "'" + json.dumps(chr(value), ensure_ascii=False)[1:-1].replace("'", "\\'") + "'"
        return None
    if verb == "d":
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        digits = str(abs(value)).rjust(prec or 0, "0")
        return ("-" if value < 0 else "+" if "+" in flags else " " if " " in flags else "") + digits
    if verb == "t":
        return ("true" if value else "false") if isinstance(value, bool) else None
    return None


def value_text(value: Any) -> str:
    """``%v``: a value as Go's fmt prints it."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, list):
        return "[" + " ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{value_text(k)}:{value_text(value[k])}" for k in sorted(value, key=str)) + "]"
    return str(value)


def _float(value: float) -> str:
    """Go's shortest ``%v`` of a float64: ``%e`` form when the exponent is below -4 or at least 6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    text = "".join(map(str, digits))
    exp = len(text) + int(exponent) - 1
    minus = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{minus}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    return minus + format(Decimal(repr(abs(value))).normalize(), "f")


def _typed(value: Any) -> str:
    """A value with its Go type, as a bad verb or an extra value shows it: ``string=x``, ``int=5``, ``<nil>``."""
    if value is None:
        return "<nil>"
    kind = ("bool" if isinstance(value, bool) else "int" if isinstance(value, int) else "float64"
            if isinstance(value, float) else "string" if isinstance(value, str) else "[]interface {}"
            if isinstance(value, list) else "map[string]interface {}" if isinstance(value, dict) else type(value).__name__)
    return f"{kind}={value_text(value)}"


def _cut(text: str, prec: int | None) -> str:
    return text if prec is None else text[:prec]


def _pad(text: str, width: int, flags: str, *, numeric: bool) -> str:
    if len(text) >= width:
        return text
    if "-" in flags:
        return text.ljust(width)
    if "0" in flags and numeric:
        sign = text[0] if text[:1] in ("-", "+", " ") else ""
        return sign + text[len(sign):].rjust(width - len(sign), "0")
    return text.rjust(width)
