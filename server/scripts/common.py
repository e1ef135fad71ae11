"""What the four scripts share: the error they raise, the result they return, A1111's `fix_seed`, and adding
script entries to an infotext."""
from __future__ import annotations

import base64
import copy
import io
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from sd15.a1111.infotext import quote  # A1111's infotext value quoting

#: A1111's random seed range: `random.randrange(4294967294)`
SEED_RANGE = 4294967294


class ScriptError(ValueError):
    """A bad `script_name` / `script_args` / request for a script: the server answers `status` (4xx) with
    this message, before anything is generated."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ResultLike(Protocol):
    """What `generate(request_dict)` returns: sd15's `pipeline.Result` or anything with these fields."""
    images: list
    infotexts: list
    seeds: list
    info: dict


@dataclass
class ScriptResult:
    """A script's response parts, shaped like sd15's `pipeline.Result` so the server's response builder
    takes it as it is: `images` (grid first where A1111 returns one), their `infotexts`, and `info`, the
    response's info object (A1111's keys; `index_of_first_image` is 1 when a grid leads)."""
    images: list
    infotexts: list
    info: dict
    seeds: list = field(default_factory=list)
    subseeds: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    negative_prompts: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    interrupted: bool = False


@dataclass
class Plan:
    """What a script will run: `requests` (A1111 request dicts, in the order they run) and `combine`, which
    turns their results (same order; may be shorter when the job was interrupted) into the response."""
    requests: list
    combine: Callable[[list], ScriptResult]


def base_request(request: dict) -> dict:
    """A deep copy of the request without the script fields, for the generations a script runs."""
    out = copy.deepcopy(dict(request))
    out["script_name"] = None
    out["script_args"] = []
    out["override_settings"] = dict(out.get("override_settings") or {})
    return out


def fixed_seed(seed: Any, rng: random.Random) -> Any:
    """A1111's `get_fixed_seed`: -1 (or empty) becomes a random seed, drawn once."""
    if seed is None or seed == "":
        seed = -1
    if isinstance(seed, (int, float)) and not isinstance(seed, bool) and int(seed) == -1:
        return rng.randrange(SEED_RANGE)
    return seed


def fix_seed(request: dict, rng: random.Random) -> None:
    """A1111's `processing.fix_seed`: resolve a random seed and variation seed once for the whole script."""
    request["seed"] = fixed_seed(request.get("seed", -1), rng)
    request["subseed"] = fixed_seed(request.get("subseed", -1), rng)


def with_params(infotext: Optional[str], params: dict) -> str:
    """`infotext` with `params` ("Key": value) added to its parameter line, before "Version" (where A1111
    puts extra generation parameters that a script adds)."""
    if not params:
        return infotext or ""
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
    if isinstance(value, bool):
        return int(value)
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


def encode_png(image) -> str:
    """A PIL image as the base64 PNG string an A1111 request carries (lossless, so a tile stays exact)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
