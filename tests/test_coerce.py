"""server.coerce against pydantic v1 itself (`pydantic.v1`, shipped with pydantic 2; test-only): every field type
the A1111 request models use, over a broad table of JSON-ish inputs plus random strings and numbers, must give
the same value (same Python type) where pydantic v1 accepts it, and the same errors (loc, msg, type) where it
refuses it. Plus pydantic v1's documented conversions written out by hand."""
import collections
import math
import random
from typing import Any, Dict, List, Optional

import pytest

from server.coerce import Invalid, ValidationError, coerce, convert

TYPES = [int, float, bool, str, Any, list, dict, List[str], list[str], List[Any], List[int], Dict[str, Any], Dict[int, str], Dict[str, List[int]],
         dict[str, Any], Dict[str, int], Optional[int], Optional[float], Optional[bool], Optional[str],
         Optional[List[str]], Optional[list[str]], Optional[dict], Optional[Dict[str, Any]], Optional[list],
         List[Optional[str]]]

NUMBERS = [0, 1, -1, 2, 7, 255, 2**31, 2**63, -(2**63), 10**30, 0.0, -0.0, 1.0, -1.0, 0.5, 1.5, -1.5, 1.9999,
           2.0**70, 1e20, 1e300, -1e300, 5e-324, math.inf, -math.inf, math.nan]
STRINGS = ["", " ", "0", "1", "7", "-7", "+7", " 7 ", "\t8\n", "007", "1_000", "1__0", "_1", "1.0", "1.5", "-1.5",
           ".5", "5.", "1e3", "1E3", " 1e3 ", "1e-3", "0x10", "0b1", "inf", "-inf", "+inf", "Infinity", "nan",
           "NaN", "-nan", "true", "True", "TRUE", "false", "False", "yes", "YES", "no", "on", "Off", "t", "F",
           "y", "N", " true", "true ", "1 ", "abc", "a photo", "\u0661\u0662", "\uff11\uff12", "1" * 4300,
           "1" * 4301, "9" * 30, "None", "null", "[]", "{}"]
CONTAINERS = [[], [1], ["a"], [1, "2", True, None], [[1]], [{"a": 1}], [1.5, "x"], (1, 2), ("a",), {1},
              frozenset({"z"}), collections.deque(["q", 3]), {}, {"a": 1}, {"1": [1]}, {"k": None},
              {"a": "x", "b": 2}, {1: "7", 2.5: None, None: 1}, {(1, 2): "x"}, [["a", 1]], [("a", 1), ("b", 2)], ["ab"], ["abc"], [[1, 2, 3]], b"1", b"true"]
INPUTS = [None, True, False, *NUMBERS, *STRINGS, *CONTAINERS]


_MODELS = {}


def reference(tp, value, allow_inf_nan=True):
    """pydantic v1's verdict for a required field of type `tp`: ("ok", value) or ("err", [(loc, msg, type)])."""
    pv1 = pytest.importorskip("pydantic.v1")  # pydantic 2 ships pydantic 1.10 under this name
    key = (repr(tp), allow_inf_nan)
    if key not in _MODELS:
        config = type("Config", (), {"allow_inf_nan": allow_inf_nan})
        _MODELS[key] = pv1.create_model("M", __config__=config, f=(tp, ...))
    try:
        return "ok", _MODELS[key](f=value).f
    except pv1.ValidationError as e:
        return "err", [(tuple(err["loc"][1:]), err["msg"], err["type"]) for err in e.errors()]


def ours(tp, value, allow_inf_nan=True):
    try:
        return "ok", coerce(value, tp, allow_inf_nan=allow_inf_nan)
    except Invalid as e:
        return "err", [(tuple(p), m, t) for p, m, t in e.errors]


def same(a, b) -> bool:
    """Equal values of the same types, recursively (so 1, 1.0 and True differ; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def check(tp, value, allow_inf_nan=True):
    want, got = reference(tp, value, allow_inf_nan), ours(tp, value, allow_inf_nan)
    assert want[0] == got[0] and same(want[1], got[1]), f"{tp!r} <- {value!r}: pydantic v1 {want}, ours {got}"


@pytest.mark.parametrize("tp", TYPES, ids=repr)
def test_table_matches_pydantic_v1(tp):
    for value in INPUTS:
        check(tp, value)


@pytest.mark.parametrize("tp", [float, Optional[float], List[float], Dict[str, float]], ids=repr)
def test_finite_only_matches_pydantic_v1_allow_inf_nan_false(tp):
    for value in INPUTS:
        check(tp, value, allow_inf_nan=False)


def test_random_strings_and_numbers_match_pydantic_v1():
    rng = random.Random(1234)
    alphabet = "0123456789 +-._eE\tinfatyo"
    values = []
    for _ in range(1500):
        values.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))))
        values.append(rng.uniform(-1e6, 1e6))
        values.append(rng.randint(-(2**70), 2**70))
        values.append(rng.choice([int, float, str])(rng.randint(-5, 5)))
    for tp in (int, float, bool, str):
        for value in values:
            check(tp, value)


def test_pydantic_v1_documented_conversions():
    # "int: pydantic uses int(v)": truncation, booleans, digit strings with spaces/underscores
    assert coerce(True, int) == 1 and type(coerce(True, int)) is int
    assert coerce(False, int) == 0
    assert coerce(1.9, int) == 1 and coerce(-1.9, int) == -1
    assert coerce(" 42 ", int) == 42 and coerce("1_000", int) == 1000 and coerce("-7", int) == -7
    # "float: float(v)": ints and booleans, numeric strings including exponents, inf and nan
    assert coerce(7, float) == 7.0 and type(coerce(7, float)) is float
    assert coerce(True, float) == 1.0
    assert coerce("1e3", float) == 1000.0 and coerce(" 2.5 ", float) == 2.5
    assert coerce("inf", float) == math.inf and math.isnan(coerce("nan", float))
    # "bool": exactly these values, case-insensitive strings, no stripping
    for v in (True, 1, 1.0, "1", "on", "t", "true", "y", "yes", "YES", "On"):
        assert coerce(v, bool) is True, v
    for v in (False, 0, 0.0, "0", "off", "f", "false", "n", "no", "No"):
        assert coerce(v, bool) is False, v
    # "str: strings as-is; int, float and Decimal coerced with str(v)" (bool is an int)
    assert coerce(True, str) == "True" and coerce(False, str) == "False"
    assert coerce(12, str) == "12" and coerce(1.5, str) == "1.5" and coerce(1e20, str) == "1e+20"
    # lists from any sequence, dicts from pairs
    assert coerce(("a", 1, True), List[str]) == ["a", "1", "True"]
    assert coerce([["a", 1]], Dict[str, Any]) == {"a": 1}
    assert coerce(None, Optional[int]) is None


@pytest.mark.parametrize("tp,value,msg,type_", [
    (int, "1.0", "value is not a valid integer", "type_error.integer"),
    (int, math.inf, "value is not a valid integer", "type_error.integer"),
    (int, [1], "value is not a valid integer", "type_error.integer"),
    (float, "seven", "value is not a valid float", "type_error.float"),
    (float, {}, "value is not a valid float", "type_error.float"),
    (bool, 2, "value could not be parsed to a boolean", "type_error.bool"),
    (bool, " true", "value could not be parsed to a boolean", "type_error.bool"),
    (bool, [], "value could not be parsed to a boolean", "type_error.bool"),
    (str, [], "str type expected", "type_error.str"),
    (str, None, "none is not an allowed value", "type_error.none.not_allowed"),
    (list, "abc", "value is not a valid list", "type_error.list"),
    (dict, [1, 2], "value is not a valid dict", "type_error.dict"),
    (dict, "abc", "value is not a valid dict", "type_error.dict"),
])
def test_pydantic_v1_documented_errors(tp, value, msg, type_):
    with pytest.raises(Invalid) as e:
        coerce(value, tp)
    assert e.value.errors == [((), msg, type_)]


def test_convert_gives_fastapi_422_problems_with_nested_locations():
    assert convert("inpainting_mask_invert", True, int) == 1
    assert convert("cfg_scale", 7, float) == 7.0
    assert convert("prompt", False, str) == "False"
    with pytest.raises(ValidationError) as e:
        convert("styles", ["a", None, [1], 2], List[str])
    assert e.value.problems == [
        {"loc": ["body", "styles", 1], "msg": "none is not an allowed value", "type": "type_error.none.not_allowed"},
        {"loc": ["body", "styles", 2], "msg": "str type expected", "type": "type_error.str"},
    ]
    with pytest.raises(ValidationError) as e:
        convert("override_settings", {"a": 1, "b": "x"}, Dict[str, int])
    assert e.value.problems == [{"loc": ["body", "override_settings", "b"], "msg": "value is not a valid integer",
                                 "type": "type_error.integer"}]
    with pytest.raises(ValidationError) as e:  # request bodies refuse non-finite floats (allow_inf_nan=False)
        convert("cfg_scale", "nan", float)
    assert e.value.problems == [{"loc": ["body", "cfg_scale"], "msg": "ensure this value is a finite number",
                                 "type": "value_error.number.not_finite_number"}]


def test_unsupported_type_is_a_programming_error():
    with pytest.raises(TypeError):
        coerce(1, tuple)
    with pytest.raises(TypeError):
        coerce(1, Optional[int | str])
