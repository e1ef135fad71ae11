"""JSON values -> field types with pydantic v1's coercion rules, and FastAPI's 422 error shape.

A1111 v1.10 validates request bodies with pydantic 1.x models under FastAPI 0.94, so a client may send
`true` for an integer field (-> 1), `7` for a float field (-> 7.0), `"7"` for an integer (-> 7), `1.9`
for an integer (-> 1, truncated), `1` or `"yes"` for a boolean and `12` or `false` for a string
(-> "12", "False"). This module reproduces those rules (pydantic v1's `int_validator`, `float_validator`,
`bool_validator`, `str_validator`, `list_validator`, `dict_validator` and its sequence/mapping handling)
for the field types the A1111 request models use: int, float, bool, str, Any, Optional[X], list / List[X],
dict / Dict[K, V]. Errors carry pydantic v1's words and type codes (`value is not a valid integer`,
`type_error.integer`, ...) at FastAPI's location (`["body", field, index...]`).

One deliberate setting: `convert` rejects NaN and infinities in float fields (pydantic v1's
`Config.allow_inf_nan = False`, "ensure this value is a finite number"); stock A1111 lets them through
to the sampler, which then returns black images.
"""
from __future__ import annotations

import collections
import decimal
import types
import typing
from typing import Any

# -------------------------------------------------------------------------------------------------
# Errors
# -------------------------------------------------------------------------------------------------


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
NOT_FLOAT = ("value is not a valid float", "type_error.float")
NOT_BOOL = ("value could not be parsed to a boolean", "type_error.bool")
NOT_STR = ("str type expected", "type_error.str")
NOT_LIST = ("value is not a valid list", "type_error.list")
NOT_DICT = ("value is not a valid dict", "type_error.dict")
NOT_NONE = ("none is not an allowed value", "type_error.none.not_allowed")
NOT_FINITE = ("ensure this value is a finite number", "value_error.number.not_finite_number")

# -------------------------------------------------------------------------------------------------
# Scalars (pydantic v1's validators, rule for rule)
# -------------------------------------------------------------------------------------------------

_MAX_STR_INT = 4300  # pydantic v1 refuses longer digit strings before calling int()
_BOOL_TRUE = {1, "1", "on", "t", "true", "y", "yes"}  # compared after lower(), never stripped;
_BOOL_FALSE = {0, "0", "off", "f", "false", "n", "no"}  # 1.0 / 0.0 match 1 / 0 as set members


def to_int(v) -> int:
    """bool -> 0/1, float -> truncated (inf/nan fail), str/bytes -> int() (spaces and `_` allowed, "1.0" fails)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, (str, bytes, bytearray)) and len(v) > _MAX_STR_INT:
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
            _fail(*NOT_FLOAT)
    if not allow_inf_nan and (v != v or v in (float("inf"), float("-inf"))):
        _fail(*NOT_FINITE)
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
    _fail(*NOT_BOOL)


def to_str(v) -> str:
    """str as is; numbers and bools -> str(v) ("12", "1.5", "True"); bytes decoded; anything else fails."""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, decimal.Decimal)):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return v.decode()
    _fail(*NOT_STR)


def _sequence_like(v) -> bool:
    return isinstance(v, (list, tuple, set, frozenset, types.GeneratorType, collections.deque))


# -------------------------------------------------------------------------------------------------
# Any field type
# -------------------------------------------------------------------------------------------------

def _optional_inner(tp):
    """Optional[X] (Union[X, None], X | None) -> X; anything else -> None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0]
        raise TypeError(f"unsupported union {tp!r}: only Optional[X] is handled")
    return None


def coerce(value, tp, *, allow_inf_nan: bool = True, path: tuple = ()):
    """`value` as pydantic v1 validates it for a field of type `tp`; raises Invalid with every problem
    (list items and dict entries are all checked, as pydantic does)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else coerce(value, inner, allow_inf_nan=allow_inf_nan, path=path)
    if tp is Any or tp is object:
        return value
    if value is None:
        _fail(*NOT_NONE, path)
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
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
    if origin is list:
        if not _sequence_like(value):
            _fail(*NOT_LIST, path)
        item = args[0] if args else Any
        if item is Any:
            return list(value)
        return _collect([(path + (i,), x, item) for i, x in enumerate(value)], allow_inf_nan)
    if origin is dict:
        if not isinstance(value, dict):
            try:
                value = dict(value)
            except (TypeError, ValueError):
                _fail(*NOT_DICT, path)
        key_tp, value_tp = args if args else (Any, Any)
        if key_tp is Any and value_tp is Any:
            return value
        out, errors = {}, []
        for k, v in value.items():  # a bad key skips its value; a value's location is the key as sent
            try:
                key = coerce(k, key_tp, allow_inf_nan=allow_inf_nan, path=path + ("__key__",))
            except Invalid as e:
                errors += e.errors
                continue
            try:
                out[key] = coerce(v, value_tp, allow_inf_nan=allow_inf_nan, path=path + (k,))
            except Invalid as e:
                errors += e.errors
        if errors:
            raise Invalid(errors)
        return out
    raise TypeError(f"unsupported field type {tp!r}")


def _collect(items, allow_inf_nan: bool) -> list:
    """Coerce (path, value, type) triples; every problem is reported together."""
    out, errors = [], []
    for path, value, tp in items:
        try:
            out.append(coerce(value, tp, allow_inf_nan=allow_inf_nan, path=path))
        except Invalid as e:
            errors += e.errors
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
