"""JSON values -> field types with pydantic v1's coercion rules, and FastAPI's 422 error shape.

A1111 v1.10 validates request bodies with pydantic 1.x models under FastAPI 0.94, so a client may send
`true` for an int (-> 1), `7` for a float (-> 7.0), `"7"` or `1.9` for an int (-> 7, 1), `"yes"` for a bool
and `12` for a str (-> "12"). `coerce` follows pydantic v1's `int_validator`, `float_validator`,
`bool_validator`, `str_validator`, `list_validator` and `dict_validator` for the types A1111's models use
(int, float, bool, str, Any, Optional[X], list / List[X], dict / Dict[K, V]), with its error words and type
codes. One deliberate difference: `convert` refuses NaN and infinities in float fields (pydantic's
`allow_inf_nan = False`); stock A1111 passes them to the sampler, which returns black images.
"""
from __future__ import annotations

import collections
import decimal
import types
import typing
from typing import Any


class ValidationError(Exception):
    """FastAPI's request-validation error: HTTP 422 `{"detail": [{"loc", "msg", "type"}, ...]}`."""

    def __init__(self, problems: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, p['loc'][1:]))}: {p['msg']}" for p in problems))
        self.problems = problems

    @staticmethod
    def problem(name, msg: str, type_: str) -> dict:
        """One entry; `name` is a field name, a tuple of path parts, or None (the whole body)."""
        loc = ["body"] if name is None else ["body", *name] if isinstance(name, tuple) else ["body", name]
        return {"loc": loc, "msg": msg, "type": type_}

    @classmethod
    def one(cls, name, msg: str, type_: str = "value_error") -> "ValidationError":
        return cls([cls.problem(name, msg, type_)])


class Invalid(Exception):
    """Coercion failures: a list of (path inside the value, msg, type)."""

    def __init__(self, errors: list[tuple[tuple, str, str]]):
        super().__init__(errors)
        self.errors = errors


def _fail(msg: str, type_: str, path: tuple = ()):
    raise Invalid([(path, msg, type_)])


NOT_INT = ("value is not a valid integer", "type_error.integer")
_BOOL_TRUE = {1, "1", "on", "t", "true", "y", "yes"}  # compared after lower(), never stripped;
_BOOL_FALSE = {0, "0", "off", "f", "false", "n", "no"}  # 1.0 / 0.0 match 1 / 0 as set members


def to_int(v) -> int:
    """bool -> 0/1, float -> truncated (inf/nan fail), str/bytes -> int() (spaces and `_` allowed, "1.0" fails)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, (str, bytes, bytearray)) and len(v) > 4300:  # pydantic refuses longer digit strings
        _fail(*NOT_INT)
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        _fail(*NOT_INT)


def to_float(v, allow_inf_nan: bool = True) -> float:
    """bool/int -> float, str/bytes -> float() ("inf", "nan", "1e3", " 2 ", "1_0" all parse)."""
    if not isinstance(v, float):
        try:
            v = float(v)
        except (TypeError, ValueError):
            _fail("value is not a valid float", "type_error.float")
    if not allow_inf_nan and (v != v or v in (float("inf"), float("-inf"))):
        _fail("ensure this value is a finite number", "value_error.number.not_finite_number")
    return v


def to_bool(v) -> bool:
    """True/False; 1/0 (and 1.0/0.0); the strings 1/0, on/off, t/f, true/false, y/n, yes/no in any case."""
    if v is True or v is False:
        return v
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str):
        v = v.lower()
    try:
        if v in _BOOL_TRUE:
            return True
        if v in _BOOL_FALSE:
            return False
    except TypeError:  # unhashable (list, dict)
        pass
    _fail("value could not be parsed to a boolean", "type_error.bool")


def to_str(v) -> str:
    """str as is; numbers and bools -> str(v) ("12", "1.5", "True"); bytes decoded; anything else fails."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, decimal.Decimal)):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return v.decode()
    _fail("str type expected", "type_error.str")


def coerce(value, tp, *, allow_inf_nan: bool = True, path: tuple = ()):
    """`value` as pydantic v1 validates it for a field of type `tp`; raises Invalid with every problem
    (list items and dict entries are all checked, as pydantic does)."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(rest) == len(args):
            raise TypeError(f"unsupported union {tp!r}: only Optional[X] is handled")
        return None if value is None else coerce(value, rest[0], allow_inf_nan=allow_inf_nan, path=path)
    if tp is Any or tp is object:
        return value
    if value is None:
        _fail("none is not an allowed value", "type_error.none.not_allowed", path)
    try:
        if origin is bool:
            return to_bool(value)
        if origin is int:
            return to_int(value)
        if origin is float:
            return to_float(value, allow_inf_nan)
        if origin is str:
            return to_str(value)
    except Invalid as e:
        raise Invalid([(path + p, m, t) for p, m, t in e.errors]) from None
    out, errors = ([] if origin is list else {}), []
    if origin is list:
        if not isinstance(value, (list, tuple, set, frozenset, types.GeneratorType, collections.deque)):
            _fail("value is not a valid list", "type_error.list", path)
        item = args[0] if args else Any
        if item is Any:
            return list(value)
        for i, x in enumerate(value):
            try:
                out.append(coerce(x, item, allow_inf_nan=allow_inf_nan, path=path + (i,)))
            except Invalid as e:
                errors += e.errors
    elif origin is dict:
        if not isinstance(value, dict):
            try:
                value = dict(value)
            except (TypeError, ValueError):
                _fail("value is not a valid dict", "type_error.dict", path)
        key_tp, value_tp = args if args else (Any, Any)
        if key_tp is Any and value_tp is Any:
            return value
        for k, v in value.items():  # a bad key skips its value; a value's location is the key as sent
            try:
                key = coerce(k, key_tp, allow_inf_nan=allow_inf_nan, path=path + ("__key__",))
                out[key] = coerce(v, value_tp, allow_inf_nan=allow_inf_nan, path=path + (k,))
            except Invalid as e:
                errors += e.errors
    else:
        raise TypeError(f"unsupported field type {tp!r}")
    if errors:
        raise Invalid(errors)
    return out


def convert(name: str, value, tp):
    """One request field (`name`, JSON `value`) to its type `tp`; a ValidationError (422) in FastAPI's shape
    listing every problem. NaN and infinities are refused in float fields."""
    try:
        return coerce(value, tp, allow_inf_nan=False)
    except Invalid as e:
        raise ValidationError([ValidationError.problem((name, *p), m, t) for p, m, t in e.errors]) from None
