"""A1111 prompt syntax (sd15.a1111.prompt).

Expected values are exact. Emphasis weights are compared with `==` against the same float products A1111
computes (it multiplies weights in bracket-closing order, e.g. ((d)) -> 1.0 * 1.1 * 1.1), so no tolerance is
needed anywhere.
"""
from __future__ import annotations

import re

import pytest

from sd15.a1111.prompt import (BOS, COMMA, EOS, PAD, Chunk, chunk_tokens, extract_networks,
                               make_embedding_finder, network_multipliers, parse_prompt_attention,
                               prompt_schedules, schedule_index, split_and, tokenize_prompt)

R = 1.1          # (x)
S = 1 / 1.1      # [x]


# =============================================================================================
# parse_prompt_attention
# =============================================================================================

def test_special_tokens_are_the_tokenizers():
    from sd15.clip.tokenizer import Tokenizer

    tok = Tokenizer()
    ids = tok.tokenize(["a"])[0].tolist()  # BOS, "a", EOS, EOS padding
    assert (ids[0], ids[2], ids[-1]) == (BOS, EOS, PAD) and tok.encode(",") == [COMMA]


def test_spec_example_7_2():
    assert parse_prompt_attention(r"a (b:1.2) [c] ((d)) \(e\) f BREAK g") == [
        ("a ", 1.0), ("b", 1.2), (" ", 1.0), ("c", 0.9090909090909091), (" ", 1.0),
        ("d", 1.2100000000000002), (" (e) f", 1.0), ("BREAK", -1), ("g", 1.0)]


def test_appendix_a5_lone_backslash():
    assert parse_prompt_attention(r"x \ y : z") == [("x  y : z", 1.0)]


@pytest.mark.parametrize("text", ["", "()", "[]", "([])", "\\"])
def test_empty_result(text):
    # nothing at all, or only a lone backslash (which yields "" with weight 1)
    assert parse_prompt_attention(text) == [("", 1.0)]


@pytest.mark.parametrize("text, expected", [
    ("a", [("a", 1.0)]),
    ("(a)", [("a", 1.1)]),
    ("[a]", [("a", S)]),
    ("(a:1.2)", [("a", 1.2)]),
    ("(a: 1.5 )", [("a", 1.5)]),                 # spaces around the number are allowed
    ("(a:.5)", [("a", 0.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:0)", [("a", 0.0)]),
])
def test_simple_emphasis(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text, weight", [
    ("((a))", 1.0 * R * R),                      # 1.2100000000000002
    ("(((a)))", 1.0 * R * R * R),                # 1.3310000000000004
    ("[[a]]", 1.0 * S * S),                      # 0.8264462809917354
    ("[[[a]]]", 1.0 * S * S * S),
    ("([a])", 1.0 * S * R),                      # inner closes first
    ("[(a)]", 1.0 * R * S),
    ("((a:1.5))", 1.0 * 1.5 * R),
    ("((a):1.5)", 1.0 * R * 1.5),
])
def test_nested_products(text, weight):
    assert parse_prompt_attention(text) == [("a", weight)]


def test_nested_products_exact_float_values():
    assert parse_prompt_attention("(((a)))") == [("a", 1.3310000000000004)]
    assert parse_prompt_attention("[[a]]") == [("a", 0.8264462809917354)]


def test_nesting_keeps_inner_and_outer_fragments_apart():
    assert parse_prompt_attention("(a (b:1.5) c)") == [("a ", 1.1), ("b", 1.5 * R), (" c", 1.1)]
    assert parse_prompt_attention("[a (b) c]") == [("a ", S), ("b", 1.0 * R * S), (" c", S)]


def test_merging_of_equal_weights():
    # (b:1.0) multiplies by exactly 1.0, so "a", "b", "c" all weigh 1.0 and merge
    assert parse_prompt_attention("a(b:1.0)c") == [("abc", 1.0)]
    assert parse_prompt_attention("(a)(b)") == [("ab", 1.1)]
    assert parse_prompt_attention("(a) (b)") == [("a", 1.1), (" ", 1.0), ("b", 1.1)]
    # 1/1.1 * 1.1 happens to be exactly 1.0 in binary floating point -> merges with neighbours
    assert 1.0 * S * R == 1.0
    assert parse_prompt_attention("x ([y]) z") == [("x y z", 1.0)]


def test_escapes():
    assert parse_prompt_attention(r"\(a\)") == [("(a)", 1.0)]
    assert parse_prompt_attention(r"\[a\]") == [("[a]", 1.0)]
    assert parse_prompt_attention(r"a\\b") == [("a\\b", 1.0)]
    # escapes inside brackets are multiplied like any text
    assert parse_prompt_attention(r"(\(a\))") == [("(a)", 1.1)]
    assert parse_prompt_attention(r"[x\]]") == [("x]", S)]
    # a backslash before another character is dropped alone: "\a" -> "a"
    assert parse_prompt_attention(r"\a b\ ") == [("a b ", 1.0)]
    assert parse_prompt_attention("a\\") == [("a", 1.0)]
    # an escaped colon does not exist: "\" is dropped and ":1.2)" is a real weight
    assert parse_prompt_attention(r"(a\:1.2)") == [("a", 1.2)]


def test_unbalanced_brackets():
    assert parse_prompt_attention("(a") == [("a", 1.1)]               # unclosed ( -> x1.1 at the end
    assert parse_prompt_attention("[a") == [("a", S)]
    assert parse_prompt_attention("a)") == [("a)", 1.0)]              # unmatched closer is text
    assert parse_prompt_attention("a]") == [("a]", 1.0)]
    assert parse_prompt_attention("a) (b") == [("a) ", 1.0), ("b", 1.1)]
    # ((a): the inner ")" closes first (x1.1), the unclosed outer "(" applies x1.1 at the end
    assert parse_prompt_attention("((a)") == [("a", 1.0 * R * R)]
    # unclosed: all round openers are applied first, then all square ones
    assert parse_prompt_attention("(a [b") == [("a ", 1.1), ("b", 1.0 * R * S)]
    assert parse_prompt_attention("[a (b") == [("a ", S), ("b", 1.0 * R * S)]
    # "]" does not close "(" and vice versa
    assert parse_prompt_attention("(a]") == [("a]", 1.1)]
    assert parse_prompt_attention("[a)") == [("a)", S)]


def test_colon_that_is_not_a_weight():
    assert parse_prompt_attention("(a:b)") == [("a:b", 1.1)]
    assert parse_prompt_attention("a: b") == [("a: b", 1.0)]
    # ":1.2)" with no open "(" is plain text
    assert parse_prompt_attention("a:1.2) b") == [("a:1.2) b", 1.0)]
    # "[a:1.2)": the weight closer needs an open "(", "[" stays unclosed -> /1.1
    assert parse_prompt_attention("[a:1.2)") == [("a:1.2)", S)]
    # ":1.2" followed by ":" is not a closer; ":1.3)" is, and applies to everything since "("
    assert parse_prompt_attention("(a:1.2:1.3)") == [("a:1.2", 1.3)]
    # the weight closer is matched before ")"; the (x:N) form applies N only (no extra 1.1)
    assert parse_prompt_attention("(a:2)") == [("a", 2.0)]


def test_weight_that_is_not_a_float_raises_like_a1111():
    # [+-]?[.\d]+ matches "1.2.3" but float() rejects it; A1111 raises as well
    with pytest.raises(ValueError):
        parse_prompt_attention("(a:1.2.3)")


def test_break():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1), ("b", 1.0)]
    assert parse_prompt_attention("a\nBREAK\n b") == [("a", 1.0), ("BREAK", -1), ("b", 1.0)]
    assert parse_prompt_attention("BREAK") == [("", 1.0), ("BREAK", -1), ("", 1.0)]
    assert parse_prompt_attention("BREAK a") == [("", 1.0), ("BREAK", -1), ("a", 1.0)]
    assert parse_prompt_attention("a BREAK") == [("a", 1.0), ("BREAK", -1), ("", 1.0)]
    assert parse_prompt_attention("a BREAK BREAK b") == [
        ("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]
    # " BREAK " is its own text run between the brackets: it splits into "", "" around the marker
    assert parse_prompt_attention("(x) BREAK (y)") == [
        ("x", 1.1), ("", 1.0), ("BREAK", -1), ("", 1.0), ("y", 1.1)]
    # not a whole word, or not upper case: plain text
    assert parse_prompt_attention("aBREAK b") == [("aBREAK b", 1.0)]
    assert parse_prompt_attention("a BREAKs") == [("a BREAKs", 1.0)]
    assert parse_prompt_attention("a break b") == [("a break b", 1.0)]
    # \b matches next to punctuation
    assert parse_prompt_attention("a,BREAK,b") == [("a,", 1.0), ("BREAK", -1), (",b", 1.0)]


def test_break_inside_brackets_gets_its_weight_multiplied():
    # the marker becomes ("BREAK", -1.1): no longer a chunk break, just the word
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


# =============================================================================================
# prompt_schedules
# =============================================================================================

def test_appendix_a5_schedules():
    assert prompt_schedules("a [b:c:0.5] d", 20) == [(10, "a b d"), (20, "a c d")]
    assert prompt_schedules("[a|b] x", 6) == [
        (1, "a x"), (2, "b x"), (3, "a x"), (4, "b x"), (5, "a x"), (6, "b x")]
    # hires pass, base 20, hires 30
    assert prompt_schedules("a [b:c:0.5] d", 20, hires_steps=30) == [(30, "a c d")]
    assert prompt_schedules("[b:c:1.5]", 20, hires_steps=30) == [(15, "b"), (30, "c")]
    assert prompt_schedules("[b:c:25]", 20, hires_steps=30) == [(5, "b"), (30, "c")]


def test_plain_prompt_and_empty_prompt():
    assert prompt_schedules("a photo of a cat", 20) == [(20, "a photo of a cat")]
    assert prompt_schedules("", 20) == [(20, "")]
    # emphasis is left for parse_prompt_attention, verbatim
    assert prompt_schedules("(a:1.2) [b] ((c))", 20) == [(20, "(a:1.2) [b] ((c))")]


@pytest.mark.parametrize("steps, expected", [
    (10, [(5, "a"), (10, "b")]),      # int(0.5 * 10) = 5
    (20, [(10, "a"), (20, "b")]),
    (30, [(15, "a"), (30, "b")]),
])
def test_from_to_fraction(steps, expected):
    assert prompt_schedules("[a:b:0.5]", steps) == expected


@pytest.mark.parametrize("steps, expected", [
    (10, [(5, "a"), (10, "b")]),      # absolute step 5 whatever the step count
    (20, [(5, "a"), (20, "b")]),
    (30, [(5, "a"), (30, "b")]),
])
def test_from_to_absolute(steps, expected):
    assert prompt_schedules("[a:b:5]", steps) == expected


@pytest.mark.parametrize("steps, expected", [
    (10, [(3, "a"), (10, "")]),       # 0.3*10 = 3.0, 0.3*20 = 6.0, 0.3*30 = 9.0 exactly
    (20, [(6, "a"), (20, "")]),
    (30, [(9, "a"), (30, "")]),
])
def test_remove_after(steps, expected):
    assert prompt_schedules("[a::0.3]", steps) == expected


@pytest.mark.parametrize("steps, expected", [
    (10, [(7, ""), (10, "a")]),       # 0.7*10 = 7.0, 0.7*20 = 14.0, 0.7*30 = 21.0
    (20, [(14, ""), (20, "a")]),
    (30, [(21, ""), (30, "a")]),
])
def test_add_after_empty_from(steps, expected):
    assert prompt_schedules("[:a:0.7]", steps) == expected


@pytest.mark.parametrize("prompt, steps, expected", [
    ("a [to:8]", 10, [(8, "a "), (10, "a to")]),
    ("a [to:0.25]", 20, [(5, "a "), (20, "a to")]),
    ("a [to: 3 ] b", 30, [(3, "a  b"), (30, "a to b")]),   # whitespace around N is dropped
    ("[:3]", 10, [(3, ""), (10, "")]),
    ("[::3]", 10, [(3, ""), (10, "")]),
])
def test_to_form(prompt, steps, expected):
    assert prompt_schedules(prompt, steps) == expected


def test_whitespace_inside_from_and_to_is_kept():
    # only whitespace right around N is dropped; " c " belongs to "to"
    assert prompt_schedules("a [b : c : 1] d", 10) == [(1, "a b  d"), (10, "a  c  d")]
    assert prompt_schedules("a [b: 3]", 10) == [(3, "a "), (10, "a b")]


@pytest.mark.parametrize("number, steps, expected", [
    ("50", 20, [(20, "a")]),             # clamped to steps: 20 <= 20 -> "from" throughout
    ("20", 20, [(20, "a")]),
    ("19", 20, [(19, "a"), (20, "b")]),
    ("0", 20, [(20, "b")]),              # 0 is not a switch point; 1 <= 0 is false -> "to"
    ("-3", 20, [(20, "b")]),
    ("+3", 20, [(3, "a"), (20, "b")]),
    ("0.01", 20, [(20, "b")]),           # int(0.2) = 0
    ("1.0", 20, [(20, "a")]),            # has a "." -> fraction: 1.0*20 = 20
    ("1", 20, [(1, "a"), (20, "b")]),    # no "." -> absolute step 1
    ("5.", 20, [(20, "a")]),             # "5." has a "." -> 5*20 = 100 -> clamped to 20
    (".25", 20, [(5, "a"), (20, "b")]),
    ("1e1", 20, [(10, "a"), (20, "b")]),  # no "." -> absolute 10
    ("2.5e-1", 20, [(5, "a"), (20, "b")]),
    ("0.29", 100, [(28, "a"), (100, "b")]),  # 0.29*100 = 28.999999999999996, truncated by int()
    ("-0.5", 20, [(20, "b")]),
])
def test_number_resolution_first_pass(number, steps, expected):
    assert prompt_schedules(f"[a:b:{number}]", steps) == expected


@pytest.mark.parametrize("number, expected", [
    ("0.5", [(10, "a"), (20, "b")]),     # < 1: fraction of steps
    ("1.0", [(1, "a"), (20, "b")]),      # >= 1: absolute, even with a "."
    ("5.", [(5, "a"), (20, "b")]),
    ("3", [(3, "a"), (20, "b")]),
    ("0.01", [(20, "b")]),
])
def test_old_scheduling(number, expected):
    assert prompt_schedules(f"[a:b:{number}]", 20, use_old_scheduling=True) == expected


def test_old_scheduling_in_hires_pass_uses_base_steps():
    # use_old_scheduling ignores hires_steps: the same rule and step count as the first pass
    assert prompt_schedules("[a:b:0.5]", 20, hires_steps=30, use_old_scheduling=True) == [
        (10, "a"), (20, "b")]
    assert prompt_schedules("[a:b:25]", 20, hires_steps=30, use_old_scheduling=True) == [
        (20, "a")]  # 25 clamped to 20


@pytest.mark.parametrize("number, expected", [
    ("0.5", [(30, "b")]),                 # (0.5 - 1) * 30 = -15 -> whole hires pass uses "to"
    ("1.5", [(15, "a"), (30, "b")]),      # (1.5 - 1) * 30 = 15
    ("2.0", [(30, "a")]),                 # (2 - 1) * 30 = 30
    ("1.1", [(3, "a"), (30, "b")]),       # (1.1 - 1) * 30 = 3.0000000000000027
    ("25", [(5, "a"), (30, "b")]),        # 25 - 20
    ("15", [(30, "b")]),                  # 15 - 20 = -5
    ("21", [(1, "a"), (30, "b")]),
    ("60", [(30, "a")]),                  # 40, clamped to 30
])
def test_hires_pass(number, expected):
    assert prompt_schedules(f"[a:b:{number}]", 20, hires_steps=30) == expected


def test_hires_pass_alternation_counts_hires_steps():
    assert prompt_schedules("[a|b]", 20, hires_steps=3) == [(1, "a"), (2, "b"), (3, "a")]


def test_nested_editing():
    # inner switch at 3, outer at 6
    assert prompt_schedules("[[a:b:0.3]:c:0.6]", 10) == [(3, "a"), (6, "b"), (10, "c")]
    # editing inside "to": switch points from every branch count
    assert prompt_schedules("a[b:[c:d:2]:1]e", 10) == [(1, "abe"), (2, "ace"), (10, "ade")]
    # a switch point from a branch that is never shown still adds an entry
    assert prompt_schedules("[[a:b:8]:c:2]", 10) == [(2, "a"), (8, "c"), (10, "c")]


def test_emphasis_inside_editing_and_editing_inside_emphasis():
    assert prompt_schedules("[(a:2):3]", 10) == [(3, ""), (10, "(a:2)")]
    assert prompt_schedules("a [[[b]]:2]", 10) == [(2, "a "), (10, "a [[b]]")]
    assert prompt_schedules("(a [b:c:0.5]:1.2)", 10) == [(5, "(a b:1.2)"), (10, "(a c:1.2)")]
    assert prompt_schedules("((x [b:c:3]))", 20) == [(3, "((x b))"), (20, "((x c))")]
    assert prompt_schedules("[x [b:c:3]]", 20) == [(3, "[x b]"), (20, "[x c]")]
    assert prompt_schedules("(a:[1.2:1.5:4])", 10) == [(4, "(a:1.2)"), (10, "(a:1.5)")]


def test_editing_then_emphasis_parse():
    sched = prompt_schedules("a (b [c:d:0.5]:1.2) e", 20)
    assert sched == [(10, "a (b c:1.2) e"), (20, "a (b d:1.2) e")]
    assert parse_prompt_attention(sched[0][1]) == [("a ", 1.0), ("b c", 1.2), (" e", 1.0)]
    assert parse_prompt_attention(sched[1][1]) == [("a ", 1.0), ("b d", 1.2), (" e", 1.0)]


def test_several_edits():
    assert prompt_schedules("[a:b:2] [c:d:4]", 5) == [(2, "a c"), (4, "b c"), (5, "b d")]
    assert prompt_schedules("[a:b:3] [c:d:3]", 5) == [(3, "a c"), (5, "b d")]


@pytest.mark.parametrize("prompt, steps, expected", [
    ("[a|b|c]", 6, ["a", "b", "c", "a", "b", "c"]),
    ("[a|b|c]", 10, ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a"]),
    ("[fe|]male", 4, ["female", "male", "female", "male"]),
    ("[|b]", 4, ["", "b", "", "b"]),
    ("[fe|||]male", 5, ["female", "male", "male", "male", "female"]),
    ("[a||c]", 3, ["a", "", "c"]),
    ("[a|(b:1.1)]", 3, ["a", "(b:1.1)", "a"]),
    # nested alternation: the inner one sees the same step, (P-1) % 2 == 1 whenever it is shown
    ("[a|[b|c]]", 4, ["a", "c", "a", "c"]),
    # alternation inside editing: points 1..5, switch at 3
    ("[[a|b]:c:3]", 5, ["a", "b", "a", "c", "c"]),
    ("x [a|b] [y:z:2]", 3, ["x a y", "x b y", "x a z"]),
])
def test_alternation(prompt, steps, expected):
    assert prompt_schedules(prompt, steps) == [(p, t) for p, t in zip(range(1, steps + 1), expected)]


def test_alternation_in_unused_branch_still_adds_every_step():
    assert prompt_schedules("[[a|b]:c:0]", 3) == [(1, "c"), (2, "c"), (3, "c")]


@pytest.mark.parametrize("prompt", [
    "a|b [c:d:5]",                 # "|" outside an alternation: the grammar fails
    "[a:b:5] \\",                  # dangling backslash
    "[a:b:5] \\\nx",               # backslash before a newline
])
def test_unparseable_prompt_is_used_literally(prompt):
    assert prompt_schedules(prompt, 10) == [(10, prompt)]
    assert prompt_schedules(prompt, 20, hires_steps=30) == [(30, prompt)]


@pytest.mark.parametrize("prompt, expected", [
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:c:0.5", [(10, "a [b:c:0.5")]),
    ("a [b:c:x]", [(10, "a [b:c:x]")]),          # N must be a number
    ("[a:b:c:5]", [(10, "[a:b:c:5]")]),          # too many colons
    ("[a:b:5x]", [(10, "[a:b:5x]")]),
    ("[a:b:1 2]", [(10, "[a:b:1 2]")]),
    ("a]) :b", [(10, "a]) :b")]),                # stray closers and colons are literal
    # stray openers/closers around a valid edit: the edit still works
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("a (b [c:d:2]", [(2, "a (b c"), (10, "a (b d")]),
    ("[[a:b:2]", [(2, "[a"), (10, "[b")]),
    ("[a:b:2]]", [(2, "a]"), (10, "b]")]),
    # (a:b:c) is no valid emphasis, so the enclosing edit cannot parse -> all literal
    ("[(a:b:c):d:5]", [(10, "[(a:b:c):d:5]")]),
])
def test_stray_brackets(prompt, expected):
    assert prompt_schedules(prompt, 10) == expected


def test_escapes_are_plain_text_in_schedules():
    # escaped brackets never open an edit; escapes stay verbatim for parse_prompt_attention
    assert prompt_schedules(r"\[a:b:5\]", 10) == [(10, r"\[a:b:5\]")]
    assert prompt_schedules(r"[a\:b:5]", 10) == [(5, ""), (10, r"a\:b")]
    assert prompt_schedules(r"[a\|b:5]", 10) == [(5, ""), (10, r"a\|b")]
    assert prompt_schedules(r"\(x\) [a:b:2]", 10) == [(2, r"\(x\) a"), (10, r"\(x\) b")]


def test_break_and_newlines_pass_through_schedules():
    assert prompt_schedules("a BREAK [b:c:2]\nd", 4) == [(2, "a BREAK b\nd"), (4, "a BREAK c\nd")]


def test_absurd_nesting_does_not_crash():
    p = "[" * 3000 + "a"
    assert prompt_schedules(p, 10) == [(10, p)]


def test_long_prompt_is_fast():
    p = ", ".join(f"(w{i}:1.1) [a{i}:b{i}:{i % 9 + 1}]" for i in range(300))
    sched = prompt_schedules(p, 10)
    assert [s for s, _ in sched] == list(range(1, 11))


def test_schedule_index():
    # [a:b:0.5] at 20 steps -> "a" for model calls 0..10 (11 calls), "b" for 11..19
    sched = prompt_schedules("[a:b:0.5]", 20)
    assert [sched[schedule_index(sched, s)][1] for s in range(20)] == ["a"] * 11 + ["b"] * 9
    # [a|b] -> a, a, b, a, b, ... (first alternative used twice)
    sched = prompt_schedules("[a|b]", 6)
    assert [sched[schedule_index(sched, s)][1] for s in range(6)] == ["a", "a", "b", "a", "b", "a"]
    # past the last entry A1111 falls back to entry 0
    assert schedule_index([(10, "a"), (20, "b")], 21) == 0


# =============================================================================================
# extract_networks, split_and
# =============================================================================================

def test_extract_networks():
    assert extract_networks("a <lora:x:0.5:0.2> b <lyco:y> c") == (
        "a  b  c", [("lora", "x", ["0.5", "0.2"]), ("lyco", "y", [])])
    assert extract_networks("<lora:a:1><hypernet:h:0.3>x") == (
        "x", [("lora", "a", ["1"]), ("hypernet", "h", ["0.3"])])
    assert extract_networks("<lora:n:te=0.5:unet=0.2:dyn=4>") == (
        "", [("lora", "n", ["te=0.5", "unet=0.2", "dyn=4"])])
    # any \w+ kind is removed; names may contain spaces and dots
    assert extract_networks("<foo:my lora v1.0:1>") == ("", [("foo", "my lora v1.0", ["1"])])


@pytest.mark.parametrize("text", ["<lora>", "<lo-ra:x>", "<lora:x", "<:x>", "<lora:>", "a < b > c"])
def test_extract_networks_non_tags_stay(text):
    assert extract_networks(text) == (text, [])


@pytest.mark.parametrize("args, expected", [
    ([], (1.0, 1.0, None)),
    (["0.5"], (0.5, 0.5, None)),           # unet defaults to te
    (["0.5", "0.2"], (0.5, 0.2, None)),
    (["0.5", "0.2", "8"], (0.5, 0.2, 8)),
    (["unet=0.3"], (1.0, 0.3, None)),
    (["0.7", "te=0.2"], (0.2, 0.2, None)),  # named te overrides, unet follows te
    (["te=0.5", "unet=0.2", "dyn=4"], (0.5, 0.2, 4)),
])
def test_network_multipliers(args, expected):
    assert network_multipliers(args) == expected


@pytest.mark.parametrize("prompt, expected", [
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a AND b:0.5", [("a", 1.0), (" b", 0.5)]),
    ("a :1.5 AND b : -0.3 ", [("a", 1.5), (" b", -0.3)]),
    ("cat:0.5", [("cat", 0.5)]),               # a single prompt may carry a weight too
    ("(cat:0.5)", [("(cat:0.5)", 1.0)]),       # ends in ")" -> no weight
    ("x:1.", [("x", 1.0)]),
    ("x:.5", [("x", 0.5)]),
    ("x:+2", [("x", 2.0)]),
    ("x:0.5:0.7", [("x:0.5", 0.7)]),
    ("x: 1.5e3", [("x: 1.5e3", 1.0)]),         # not a weight
    ("a and b", [("a and b", 1.0)]),           # case-sensitive
    ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),
    ("a,AND,b", [("a,", 1.0), (",b", 1.0)]),
    ("a  \n", [("a", 1.0)]),
    ("(a AND b)", [("(a", 1.0), (" b)", 1.0)]),  # split ignores brackets
    ("a AND [b:c:0.5] AND d:2", [("a", 1.0), (" [b:c:0.5]", 1.0), (" d", 2.0)]),
    ("", [("", 1.0)]),
])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


# =============================================================================================
# chunk_tokens
# =============================================================================================

_WORDS = {"a": 320, "photo": 1125, "of": 539, "cat": 2368, "break": 3431, "b": 338}


def fake_encode(text: str) -> list[int]:
    """One id per whitespace word; "," is its own token (267); "t<N>" is id N."""
    out = []
    for w in re.findall(r"[^\s,]+|,", text.lower()):
        if w == ",":
            out.append(COMMA)
        elif re.fullmatch(r"t\d+", w):
            out.append(int(w[1:]))
        else:
            out.append(_WORDS[w])
    return out


def words(lo: int, hi: int) -> str:
    """'t<lo> ... t<hi>' (inclusive): ids lo..hi."""
    return " ".join(f"t{i}" for i in range(lo, hi + 1))


def ids(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi + 1))


def padded(toks: list[int]) -> list[int]:
    return [BOS] + toks + [EOS] * (76 - len(toks))


def chunks_of(text, **kw):
    return tokenize_prompt(text, fake_encode, **kw)


def test_empty_prompt_one_chunk():
    chunks, count = chunks_of("")
    assert len(chunks) == 1
    assert chunks[0].tokens == [BOS] + [EOS] * 76
    assert chunks[0].multipliers == [1.0] * 77
    assert chunks[0].fixes == []
    assert count == 0


def test_short_prompt():
    chunks, count = chunks_of("a photo of a cat")
    assert [c.tokens for c in chunks] == [[BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71]
    assert chunks[0].multipliers == [1.0] * 77
    assert count == 5


def test_weights_follow_tokens():
    chunks, count = chunks_of("a (photo of:1.5) [cat]")
    assert chunks[0].tokens == padded([320, 1125, 539, 2368])
    assert chunks[0].multipliers == [1.0, 1.0, 1.5, 1.5, S] + [1.0] * 72
    assert count == 4


def test_exactly_75_tokens_is_one_chunk():
    chunks, count = chunks_of(words(1, 75))
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 75) + [EOS]]
    assert count == 75


def test_76_tokens_is_two_chunks():
    chunks, count = chunks_of(words(1, 76))
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 75) + [EOS], padded([76])]
    assert count == 76          # 75 for the closed chunk + 1 real token in the last one


def test_150_and_151_tokens():
    chunks, count = chunks_of(words(1, 150))
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 75) + [EOS], [BOS] + ids(76, 150) + [EOS]]
    assert count == 150
    chunks, count = chunks_of(words(1, 151))
    assert len(chunks) == 3 and chunks[2].tokens == padded([151]) and count == 151


def test_comma_backoff_within_20():
    # t1..t55 occupy chunk positions 0..54, the comma is at 55; t57.. follow.
    # When the chunk is full (75) and t76 arrives: 75 - 55 = 20 <= 20 -> t57..t75 (19 tokens) move.
    parsed = [(words(1, 55) + " ,", 1.0), (words(57, 80), 1.5)]
    chunks, count = chunk_tokens(parsed, fake_encode)
    assert [c.tokens for c in chunks] == [padded(ids(1, 55) + [COMMA]), padded(ids(57, 80))]
    assert chunks[0].multipliers == [1.0] * 77
    assert chunks[1].multipliers == [1.0] + [1.5] * 24 + [1.0] * 52   # weights move with tokens
    assert count == 75 + 24     # the backed-off chunk still counts as 75


def test_comma_backoff_outside_20():
    # comma at position 54: 75 - 54 = 21 > 20 -> no back-off, hard split at 75
    chunks, count = chunks_of(words(1, 54) + " , " + words(56, 80))
    assert [c.tokens for c in chunks] == [
        [BOS] + ids(1, 54) + [COMMA] + ids(56, 75) + [EOS], padded(ids(76, 80))]
    assert count == 80


def test_comma_backoff_disabled():
    chunks, _ = chunks_of(words(1, 55) + " , " + words(57, 80), comma_padding_backtrack=0)
    assert [c.tokens for c in chunks] == [
        [BOS] + ids(1, 55) + [COMMA] + ids(57, 75) + [EOS], padded(ids(76, 80))]


def test_comma_backoff_custom_window():
    # window 5: comma at 70 -> 75 - 70 = 5 <= 5 -> back off; comma at 69 would not
    chunks, _ = chunks_of(words(1, 70) + " , " + words(72, 80), comma_padding_backtrack=5)
    assert [c.tokens for c in chunks] == [padded(ids(1, 70) + [COMMA]), padded(ids(72, 80))]
    chunks, _ = chunks_of(words(1, 69) + " , " + words(71, 80), comma_padding_backtrack=5)
    assert chunks[0].tokens == [BOS] + ids(1, 69) + [COMMA] + ids(71, 75) + [EOS]


def test_comma_in_last_slot_and_comma_as_76th_token():
    # comma at position 74: the move is empty, same result as a hard split
    chunks, count = chunks_of(words(1, 74) + " , " + words(76, 80))
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 74) + [COMMA, EOS], padded(ids(76, 80))]
    assert count == 80
    # the 76th token is a comma: no back-off (commas never trigger it), it opens chunk 2
    chunks, count = chunks_of(words(1, 75) + " , t77")
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 75) + [EOS], padded([COMMA, 77])]
    assert count == 77


def test_comma_backoff_uses_last_comma_only():
    # commas at 40 and 60: back-off at the later one (75 - 60 = 15)
    text = words(1, 40) + " , " + words(42, 60) + " , " + words(62, 80)
    chunks, _ = chunks_of(text)
    assert [c.tokens for c in chunks] == [
        padded(ids(1, 40) + [COMMA] + ids(42, 60) + [COMMA]), padded(ids(62, 80))]


def test_comma_backoff_twice():
    # first back-off moves t57..t75 (19 tokens) to chunk 2, which then holds t57..t131 (75 tokens);
    # chunk 2's comma sits after t110 at its position 54 -> 21 > 20 -> hard split there.
    text = words(1, 55) + " , " + words(57, 110) + " , " + words(112, 140)
    chunks, count = chunks_of(text)
    assert [c.tokens for c in chunks] == [
        padded(ids(1, 55) + [COMMA]),
        [BOS] + ids(57, 110) + [COMMA] + ids(112, 131) + [EOS],
        padded(ids(132, 140))]
    assert count == 75 + 75 + 9


def test_break_forces_new_chunk():
    chunks, count = chunks_of("a BREAK b")
    assert [c.tokens for c in chunks] == [padded([320]), padded([338])]
    assert count == 76


def test_break_at_start():
    # parse: [("", 1), BREAK, ("a", 1)] -> an empty first chunk
    chunks, count = chunks_of("BREAK a")
    assert [c.tokens for c in chunks] == [padded([]), padded([320])]
    assert count == 76


def test_break_at_end():
    # the trailing "" adds no chunk because one already exists; the closed chunk counts 75
    chunks, count = chunks_of("a BREAK")
    assert [c.tokens for c in chunks] == [padded([320])]
    assert count == 75


def test_break_alone_and_twice():
    chunks, count = chunks_of("BREAK")
    assert [c.tokens for c in chunks] == [padded([])] and count == 75
    chunks, count = chunks_of("a BREAK BREAK b")
    assert [c.tokens for c in chunks] == [padded([320]), padded([]), padded([338])]
    assert count == 151


def test_break_after_exactly_75_tokens():
    chunks, count = chunks_of(words(1, 75) + " BREAK t76")
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 75) + [EOS], padded([76])]
    assert count == 76
    chunks, count = chunks_of(words(1, 75) + " BREAK")
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 75) + [EOS]] and count == 75


def test_break_resets_comma_backoff():
    # comma at 55 in chunk 1, BREAK, then 76 tokens: chunk 2 splits hard (last_comma was reset)
    chunks, _ = chunks_of(words(1, 55) + " , BREAK " + words(101, 176))
    assert [c.tokens for c in chunks] == [
        padded(ids(1, 55) + [COMMA]), [BOS] + ids(101, 175) + [EOS], padded([176])]


def test_break_inside_brackets_is_a_word():
    chunks, _ = chunks_of("(a BREAK b)")
    assert [c.tokens for c in chunks] == [padded([320, 3431, 338])]
    assert chunks[0].multipliers == [1.0, 1.1, -1.1, 1.1] + [1.0] * 73


def test_emphasis_none_skips_parsing():
    chunks, count = chunks_of("a BREAK b", emphasis="None")
    assert [c.tokens for c in chunks] == [padded([320, 3431, 338])] and count == 3
    chunks, _ = chunks_of("a [b]", emphasis="Ignore")   # Ignore still parses
    assert chunks[0].multipliers[2] == S


def test_chunk_is_a_dataclass_with_fixes():
    c = Chunk()
    assert (c.tokens, c.multipliers, c.fixes) == ([], [], [])


def test_embedding_hook():
    find = make_embedding_finder([((900,), "S", 1), ((900, 901), "L", 2), ((950,), "E3", 3)])
    # the longest name wins; placeholders are id 0 carrying the fragment weight
    chunks, count = chunk_tokens([("t1 t900 t901 t2", 1.0), ("t900 t5", 1.3), ("t950", 1.0)],
                                 fake_encode, embeddings=find)
    assert chunks[0].tokens == padded([1, 0, 0, 2, 0, 5, 0, 0, 0])
    # BOS, t1, L, L, t2 | S, t5 (weight 1.3) | E3 x3, padding
    assert chunks[0].multipliers == [1.0] * 5 + [1.3, 1.3] + [1.0] * 70
    assert chunks[0].fixes == [(1, "L"), (4, "S"), (6, "E3")]
    assert count == 9


def test_embedding_never_straddles_chunks():
    find = make_embedding_finder([((950,), "E3", 3)])
    chunks, count = chunks_of(words(1, 74) + " t950 t2", embeddings=find)
    assert [c.tokens for c in chunks] == [padded(ids(1, 74)), padded([0, 0, 0, 2])]
    assert [c.fixes for c in chunks] == [[], [(0, "E3")]]
    assert count == 75 + 4
    # fits exactly: 72 + 3 = 75
    chunks, _ = chunks_of(words(1, 72) + " t950", embeddings=find)
    assert [c.tokens for c in chunks] == [[BOS] + ids(1, 72) + [0, 0, 0, EOS]]
    assert chunks[0].fixes == [(72, "E3")]


# =============================================================================================
# Whole pipeline and the real tokenizer
# =============================================================================================

def test_pipeline_fake_tokenizer():
    prompt = "a <lora:style:0.8> (photo:1.2) of [cat:t7:0.5] AND t9 BREAK t10:0.5"
    clean, nets = extract_networks(prompt)
    assert nets == [("lora", "style", ["0.8"])]
    subs = split_and(clean)
    assert subs == [("a  (photo:1.2) of [cat:t7:0.5]", 1.0), (" t9 BREAK t10", 0.5)]
    sched = prompt_schedules(subs[0][0], 20)
    assert sched == [(10, "a  (photo:1.2) of cat"), (20, "a  (photo:1.2) of t7")]
    chunks, count = tokenize_prompt(sched[0][1], fake_encode)
    assert chunks[0].tokens == padded([320, 1125, 539, 2368])
    assert chunks[0].multipliers == [1.0, 1.0, 1.2] + [1.0] * 74
    chunks, count = tokenize_prompt(prompt_schedules(subs[1][0], 20)[0][1], fake_encode)
    assert [c.tokens for c in chunks] == [padded([9]), padded([10])] and count == 76


def _real_tokenizer():
    try:
        from sd15.clip.tokenizer import Tokenizer
    except Exception:  # not written yet, or the package does not import yet
        pytest.skip("sd15.clip.tokenizer not available")
    return Tokenizer()


def test_real_tokenizer_chunks():
    encode = _real_tokenizer().encode
    # formats.md (c) test vectors
    chunks, count = tokenize_prompt("a photo of a cat", encode)
    assert chunks[0].tokens == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71 and count == 5
    chunks, count = tokenize_prompt("masterpiece, best quality, 1girl, (red hair:1.2)", encode)
    assert chunks[0].tokens == padded([12066, 267, 949, 3027, 267, 272, 1611, 267, 736, 2225])
    assert chunks[0].multipliers == [1.0] * 9 + [1.2, 1.2] + [1.0] * 66
    assert count == 10
    # comma back-off with real ids: 70 x "a", ",", 10 x "a"  -> comma at position 70 (5 from the end)
    chunks, count = tokenize_prompt("a " * 70 + ", " + "a " * 10, encode)
    assert [c.tokens for c in chunks] == [padded([320] * 70 + [267]), padded([320] * 10)]
    assert count == 85
