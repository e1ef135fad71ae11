"""A1111 prompt syntax: extra-network tags, AND, prompt editing/alternation, emphasis, 75-token chunks.

Behaviour follows A1111 v1.10.1 (`modules/prompt_parser.py`, `modules/sd_hijack_clip.py`). One positive
prompt goes through `extract_networks` (<lora:...> tags), `split_and` ("a AND b :0.5"), `prompt_schedules`
([a:b:0.5], [a|b]) and `tokenize_prompt` ((a:1.2), BREAK, 75-token chunks). Pure Python: strings and ids.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

BOS = 49406       # <|startoftext|>
EOS = 49407       # <|endoftext|>
PAD = EOS         # SD1 pads with <|endoftext|> (A1111: id_pad = id_end)
COMMA = 267       # ",</w>"
CHUNK_LENGTH = 75  # prompt tokens per 77-token CLIP window

# ---------------------------------------------------------------------------------------------
# Extra networks
# ---------------------------------------------------------------------------------------------

_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def extract_networks(prompt: str) -> tuple[str, list[tuple[str, str, list[str]]]]:
    """Remove every `<kind:name:args...>` tag whatever its kind (lora, lyco, hypernet, ...), leaving the
    whitespace around it ("a <lora:x:1> b" -> "a  b"); return (text, [(kind, name, [raw args])])."""
    found: list[tuple[str, str, list[str]]] = []

    def take(m: re.Match) -> str:
        items = m.group(2).split(":")
        found.append((m.group(1), items[0], items[1:]))
        return ""

    return _NETWORK_TAG.sub(take, prompt), found


def network_multipliers(args: Sequence[str]) -> tuple[float, float, Optional[int]]:
    """LoRA multipliers (te, unet, dyn) from a tag's args (`<lora:NAME:te[:unet[:dyn]]>`): te defaults to 1.0,
    unet to te, dyn to None; named args (`te=`, `unet=`, `dyn=`, one "=") override positional ones."""
    named = dict(a.split("=") for a in args if a.count("=") == 1)
    positional = [a for a in args if a.count("=") != 1]
    te = float(named.get("te", positional[0] if len(positional) > 0 else 1.0))
    unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
    dyn_s = named.get("dyn", positional[2] if len(positional) > 2 else None)
    return te, unet, (int(dyn_s) if dyn_s is not None else None)


# ---------------------------------------------------------------------------------------------
# AND composition
# ---------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a positive prompt on `\\bAND\\b` into (subprompt, weight) pairs, each piece's `:weight` (default
    1.0) and trailing whitespace removed: "a AND b:0.5" -> [("a", 1.0), (" b", 0.5)]; "cat:0.5" -> 0.5."""
    pieces = [_AND_WEIGHT.match(piece).groups() for piece in _AND.split(prompt)]  # always matches
    return [(text, 1.0 if weight is None else float(weight)) for text, weight in pieces]


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------------------------
#
# The grammar A1111 parses with lark (restated):
#   top       := ( item | stray )*          stray = one of  [ ] ( ) :   kept as literal text
#   prompt    := item*
#   item      := plain | "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
#              | scheduled | alternate
#   scheduled := "[" [prompt ":"] prompt ":" ws? NUMBER ws? "]"
#   alternate := "[" prompt ("|" prompt?)+ "]"
#   plain     := ( any char except \ [ ] ( ) : |   |   "\" + any char except newline )+
# Emphasis brackets are kept verbatim (they are parsed later by parse_prompt_attention); only
# scheduled/alternate nodes are resolved. A "|" outside an alternation, a trailing "\" or "\"+newline
# makes the prompt unparseable, and then the whole prompt is used literally.
#
# Inside brackets the separators ":"/"|" at the bracket's own level decide the form, so recursive descent is
# deterministic there. At the top level a bracket that does not parse as a structure is a stray literal; that
# fallback is enough, because structures parse independently of what surrounds them.

_NUMBER_TAIL = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")


@dataclass(eq=False)
class _Sched:
    before: list             # empty for the [to:N] form
    after: list
    number: str              # NUMBER as written
    when: int = 0            # the resolved step, set by prompt_schedules


@dataclass(eq=False)
class _Alt:
    options: list            # list of node lists; an empty list is the "" alternative


class _ScheduleParser:
    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self.memo: dict[int, Optional[tuple[object, int]]] = {}

    def top(self) -> list:
        """item* with the stray characters between them; ValueError where the grammar has no reading."""
        nodes, i = self.prompt(0)
        while i < self.n:
            if self.s[i] in "|\\":  # a "|" outside an alternation, or a backslash before a newline or the end
                raise ValueError(f"unparseable {self.s[i]!r} at {i}")
            nodes.append(self.s[i])  # a stray [ ] ( ) : kept as text
            more, i = self.prompt(i + 1)
            nodes += more
        return nodes

    def prompt(self, i: int) -> tuple[list, int]:
        """item* starting at i; stops at the first position where no item starts."""
        s, n = self.s, self.n
        nodes: list = []
        start = i  # start of the current plain run
        while i < n:
            c = s[i]
            if c in "[(":
                r = self.structure(i)
                if r is None:
                    break
                if start < i:
                    nodes.append(s[start:i])
                nodes.append(r[0])
                i = start = r[1]
            elif c == "\\" and i + 1 < n and s[i + 1] != "\n":  # an escape: "\\" and the next character
                i += 2
            elif c in "]):|\\":
                break
            else:
                i += 1
        if start < i:
            nodes.append(s[start:i])
        return nodes, i

    def structure(self, i: int) -> Optional[tuple[object, int]]:
        """A bracketed item at i ('(' or '['): (node, end) or None. Memoised (pure in i)."""
        if i not in self.memo:
            self.memo[i] = self._paren(i) if self.s[i] == "(" else self._bracket(i)
        return self.memo[i]

    def _at(self, i: int) -> str:
        return self.s[i] if i < self.n else ""

    def _paren(self, i: int):
        inner, j = self.prompt(i + 1)
        if self._at(j) == ")":
            return ["(", *inner, ")"], j + 1
        if self._at(j) == ":":
            inner2, k = self.prompt(j + 1)
            if self._at(k) == ")":
                return ["(", *inner, ":", *inner2, ")"], k + 1
        return None

    def _bracket(self, i: int):
        first, j = self.prompt(i + 1)
        c = self._at(j)
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            options = [first]
            while self._at(j) == "|":
                opt, j = self.prompt(j + 1)
                options.append(opt)
            if self._at(j) == "]":
                return _Alt(options), j + 1
        elif c == ":":
            m = _NUMBER_TAIL.match(self.s, j + 1)
            if m:                                       # [to:N]
                return _Sched([], first, m.group(1)), m.end()
            second, k = self.prompt(j + 1)
            if self._at(k) == ":":
                m = _NUMBER_TAIL.match(self.s, k + 1)
                if m:                                   # [from:to:N]
                    return _Sched(first, second, m.group(1)), m.end()
        return None


def _walk(nodes: list):
    """Every _Sched and _Alt of the tree."""
    for node in nodes:
        if isinstance(node, (_Sched, _Alt)):
            yield node
            yield from _walk([node.before, node.after] if isinstance(node, _Sched) else node.options)
        elif isinstance(node, list):
            yield from _walk(node)


def _render(node, step: int) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, _Sched):
        return _render(node.before if step <= node.when else node.after, step)
    if isinstance(node, _Alt):
        return _render(node.options[(step - 1) % len(node.options)], step)
    return "".join(_render(n, step) for n in node)  # a node list (emphasis brackets: kept verbatim)


def prompt_schedules(prompt: str, steps: int, hires_steps: Optional[int] = None,
                     use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """[(end_at_step, text)] for one prompt: A1111 `get_learned_conditioning_prompt_schedules`.

    `steps` is the first pass's step count (doubled by the caller for second-order samplers). A number N
    resolves to int(N · steps) when written with a ".", else int(N); in a hires pass (`hires_steps`) the
    schedule spans hires_steps and N resolves to int((N − 1) · hires_steps) or int(N − steps).
    `use_old_scheduling`: N < 1 is a fraction of `steps`, else absolute, in both passes. Resolved values are
    clamped to the step count, those ≥ 1 become switch points, and the text at point P takes `from` while
    P ≤ N. An alternation adds every point and picks option (P − 1) % count. An unparseable prompt is
    used literally.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, steps
    else:
        int_offset, flt_offset, total = steps, 1.0, hires_steps

    try:
        tree = _ScheduleParser(prompt).top()
    except (ValueError, RecursionError):  # RecursionError: absurd bracket nesting; used literally
        return [(total, prompt)]

    points = {total}
    for node in _walk(tree):
        if isinstance(node, _Alt):
            points.update(range(1, total + 1))
            continue
        v = float(node.number)
        if use_old_scheduling:
            if v < 1:
                v *= total
        elif "." in node.number:
            v = (v - flt_offset) * total
        else:
            v = v - int_offset
        node.when = min(total, int(v))
        if node.when >= 1:
            points.add(node.when)

    return [(p, _render(tree, p)) for p in sorted(points)]


def schedule_index(schedule: Sequence[tuple[int, str]], step: int) -> int:
    """Index of the schedule entry used at 0-based model call `step`: the first with step <= end; past the
    last end, entry 0 (an A1111 quirk)."""
    return next((k for k, (end_at_step, _) in enumerate(schedule) if step <= end_at_step), 0)


# ---------------------------------------------------------------------------------------------
# Emphasis
# ---------------------------------------------------------------------------------------------

_ATTENTION_TOKEN = re.compile(r"""
      \\[()\[\]\\]                  # escape: \( \) \[ \] \\
    | \\                            # lone backslash (gives "")
    | [(\[]                         # openers
    | :\s*([+-]?[.\d]+)\s*\)        # weight closer ":1.2)"
    | [)\]]                         # closers
    | [^\\()\[\]:]+                 # text run
    | :                             # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (fragment, weight) pairs: A1111 `parse_prompt_attention`.

    `(x)` x1.1, `[x]` /1.1, `(x:N)` xN, escapes `\\( \\) \\[ \\] \\\\` are literal, unmatched closers
    and non-weight ":" are text, unclosed openers apply at the end, BREAK -> ("BREAK", -1), adjacent
    fragments of exactly equal weight merge, nothing -> [("", 1.0)]. Weights are plain float products
    in closing order (((d)) -> 1.1 * 1.1 = 1.2100000000000002). Like A1111, a weight that is not a
    float (e.g. "(a:1.2.3)") raises ValueError.
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _ATTENTION_TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for k, part in enumerate(_BREAK.split(tok)):
                if k > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    runs = itertools.groupby(res or [["", 1.0]], key=lambda frag: frag[1])  # adjacent equal weights merge
    return [("".join(text for text, _ in run), weight) for weight, run in runs]


# ---------------------------------------------------------------------------------------------
# Tokens -> 75-token chunks
# ---------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """One CLIP window: 77 ids and 77 multipliers (BOS + 75 + EOS; padding and BOS/EOS weigh 1.0).

    fixes: textual-inversion placements (offset, embedding); offset counts prompt tokens, so the
    vectors go to positions offset+1 .. offset+n_vectors of the 77 (BOS is position 0).
    """
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)


def make_embedding_finder(entries: Iterable[tuple[Sequence[int], Any, int]]) -> Callable:
    """The `embeddings` lookup of chunk_tokens, `find(tokens, position) -> (embedding, n_vectors,
    name length)` or None, from (name_token_ids, embedding, n_vectors): the longest name matching there wins
    (equal lengths: the first given)."""
    by_first: dict[int, list[tuple[tuple[int, ...], Any, int]]] = {}
    for ids, emb, n_vectors in sorted(entries, key=lambda e: -len(e[0])):  # longest first, else as given
        if ids:
            by_first.setdefault(ids[0], []).append((tuple(ids), emb, int(n_vectors)))

    def find(tokens: Sequence[int], position: int):
        for ids, emb, n_vectors in by_first.get(tokens[position], ()):
            if tuple(tokens[position:position + len(ids)]) == ids:
                return emb, n_vectors, len(ids)
        return None

    return find


def chunk_tokens(parsed: Sequence[tuple[str, float]], encode: Callable[[str], Sequence[int]], *,
                 comma_padding_backtrack: int = 20,
                 embeddings: Optional[Callable] = None) -> tuple[list[Chunk], int]:
    """A1111 `tokenize_line` after parsing: (fragment, weight) pairs -> (chunks, token_count).

    ("BREAK", -1) closes the chunk. A full chunk whose next token is not a comma moves the tokens after its
    last comma to a new chunk if that comma is within the last `comma_padding_backtrack` tokens (0: never).
    token_count is A1111's: 75 per closed chunk, the real tokens of the last one. A textual-inversion match
    (`embeddings`, see make_embedding_finder) becomes n_vectors placeholder ids 0 with the fragment's weight,
    never split across chunks, and is recorded in Chunk.fixes.
    """
    chunks: list[Chunk] = []
    cur = Chunk()
    token_count = 0
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal cur, token_count, last_comma
        token_count += len(cur.tokens) if is_last else CHUNK_LENGTH
        pad = CHUNK_LENGTH - len(cur.tokens)
        cur.tokens = [BOS] + cur.tokens + [PAD] * pad + [EOS]
        cur.multipliers = [1.0] + cur.multipliers + [1.0] * pad + [1.0]
        chunks.append(cur)
        cur = Chunk()
        last_comma = -1

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            close()
            continue
        tokens = list(encode(text))
        p = 0
        while p < len(tokens):
            tok = tokens[p]
            if tok == COMMA:
                last_comma = len(cur.tokens)
            elif (comma_padding_backtrack != 0 and len(cur.tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(cur.tokens) - last_comma <= comma_padding_backtrack):
                cut = last_comma + 1
                moved_tokens, moved_mults = cur.tokens[cut:], cur.multipliers[cut:]
                del cur.tokens[cut:], cur.multipliers[cut:]
                close()
                cur.tokens, cur.multipliers = moved_tokens, moved_mults
            if len(cur.tokens) == CHUNK_LENGTH:
                close()

            hit = embeddings(tokens, p) if embeddings is not None else None
            if hit is None:
                cur.tokens.append(tok)
                cur.multipliers.append(weight)
                p += 1
                continue
            emb, n_vectors, name_len = hit
            if len(cur.tokens) + n_vectors > CHUNK_LENGTH:
                close()
            cur.fixes.append((len(cur.tokens), emb))
            cur.tokens += [0] * n_vectors
            cur.multipliers += [weight] * n_vectors
            p += name_len

    if cur.tokens or not chunks:
        close(is_last=True)
    return chunks, token_count


def empty_chunk() -> Chunk:
    """The chunk of an empty prompt (BOS + 76 EOS, weights 1), which A1111 also uses to pad the shorter
    prompts of a batch to the same number of chunks."""
    return chunk_tokens([], lambda text: [])[0][0]


def tokenize_prompt(text: str, encode: Callable[[str], Sequence[int]], *, emphasis: str = "Original",
                    **chunk_kwargs) -> tuple[list[Chunk], int]:
    """One schedule text -> (chunks, token_count), as A1111 `tokenize_line`.

    emphasis "None" skips parsing altogether (brackets and BREAK stay literal text, weight 1); every
    other mode parses. "Ignore" differs only at encode time (multipliers are not applied there).
    """
    parsed = [(text, 1.0)] if emphasis == "None" else parse_prompt_attention(text)
    return chunk_tokens(parsed, encode, **chunk_kwargs)
