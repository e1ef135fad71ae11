"""What the four scripts share: the error they raise, their plan, the request their generations start from
(with A1111's `fix_seed`), reading their arguments, and adding script entries to an infotext."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from sd15.a1111.infotext import quote  # A1111's infotext value quoting
from sd15.pipeline import Result
from sd15.schema import fixed_seed
from server.a1111 import ApiError


class ScriptError(ApiError):
    """A bad `script_name` / `script_args` / request for a script: the server answers `status` (4xx) with
    this message, before anything is generated."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(status, message)


@dataclass
class Plan:
    """What a script runs: `requests` (A1111 request dicts in run order; the server swaps in its prepared
    requests) and `combine`: their results (same order; fewer when interrupted) -> the response, an sd15
    `pipeline.Result` as a generation returns (A1111's `Processed`: a grid first where A1111 returns one,
    `index_of_first_image` 1 in its info then), to which `run_plan` adds the warnings and whether the run was
    interrupted."""
    requests: list
    combine: Callable[[list], Result]


def base_request(request: dict, rng: Optional[random.Random] = None) -> dict:
    """A deep copy of the request without the script fields, for the generations a script runs; with `rng`,
    its seed and variation seed fixed once for the whole script (A1111's `processing.fix_seed`)."""
    out = copy.deepcopy(dict(request))
    out.update(script_name=None, script_args=[], override_settings=dict(out.get("override_settings") or {}))
    if rng is not None:
        out["seed"] = fixed_seed(out.get("seed"), rng)
        out["subseed"] = fixed_seed(out.get("subseed"), rng)
    return out


def with_params(infotext: Optional[str], params: dict) -> str:
    """`infotext` with `params` ("Key": value) added to its parameter line, before "Version" (where A1111
    puts extra generation parameters that a script adds)."""
    added = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    if not infotext:
        return added
    head, sep, line = infotext.rpartition("\n")  # A1111's parameter line is the last line
    marker = ", Version: "
    if marker in line:
        at = line.rindex(marker)
        line = f"{line[:at]}, {added}{line[at:]}"
    elif line.startswith("Version: "):
        line = f"{added}, {line}"
    else:
        line = f"{line}, {added}"
    return f"{head}{sep}{line}"


def as_int(value: Any, what: str) -> int:
    try:
        out = float(value) if isinstance(value, str) and "." in value else value
        if isinstance(out, float) and not out.is_integer():
            raise ValueError
        return int(out)
    except (TypeError, ValueError):
        raise ScriptError(f"{what}: {value!r} is not an integer") from None


def as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ScriptError(f"{what}: {value!r} is not a number") from None


def as_bool(value: Any) -> bool:
    """A checkbox argument: JSON booleans, or the strings / numbers pydantic v1 takes for booleans."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y", "t")
    return bool(value)
