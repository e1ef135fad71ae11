"""CLIP byte-level BPE tokenizer, as used by SD 1.5's text encoder (openai/clip-vit-large-patch14).

The ids match OpenAI's reference CLIP tokenizer (``simple_tokenizer.py``):

1. clean-up, in Python: ``ftfy.fix_text``, ``html.unescape`` twice, ``strip``, whitespace runs -> one space,
   ``strip``, ``lower``;
2. pre-tokenisation with the CLIP regex (case-insensitive): the special tokens, English contractions, letter
   runs, *single* digits, runs of other non-space characters; whitespace is dropped;
3. per pre-token: UTF-8 bytes -> byte symbols, ``</w>`` on the last one, BPE merges by rank.

Steps 2 and 3 run in the ``tokenizers`` library (a ``Split`` pre-tokenizer with the regex, ``ByteLevel`` for the
byte-to-symbol mapping, a ``BPE`` model with ``end_of_word_suffix="</w>"``). Its regex engine (Oniguruma) was
checked against the Python ``regex`` module (which the reference uses) on every code point; three differences
are corrected here, see ``_PATTERN`` and ``_pre_tokenizer_text``:

* ``'ſ`` (long s) is the contraction ``'s`` under IGNORECASE, so the pattern needs ``(?i)`` even though the
  text is lower-case;
* U+0345 COMBINING GREEK YPOGEGRAMMENI matches *no* alternative of the reference regex under IGNORECASE (it is
  skipped like whitespace), whereas Oniguruma counts it as a letter: it is replaced by a space;
* Oniguruma's tables (tokenizers 0.23) stop at Unicode 16; the letters and digits new in Unicode 17 (which
  ``regex`` >= 2025.9 knows) are listed explicitly.

Special tokens in the text (``<|startoftext|>``, ``<|endoftext|>``) are ids 49406/49407 where the reference's
regex matches them as a whole, i.e. not inside a punctuation run (``"!<|endoftext|>"`` is ordinary BPE).

SD 1.5 sequences are 77 tokens: BOS, up to 75 ids, EOS, then padding with EOS (see ``PAD``).

The BPE data is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (MIT, license beside it). Vocabulary: 256 byte symbols,
the same with ``</w>``, the first 48,894 merges' concatenations, then the two special tokens: 49,408 ids.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
from collections.abc import Iterable, Sequence

import ftfy
import torch
from tokenizers import Regex
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import models, pre_tokenizers

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "CONTEXT_LENGTH",
    "VOCAB_SIZE",
    "Tokenizer",
    "bytes_to_unicode",
    "clean_text",
]

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
# SD 1.5's tokenizer (openai/clip-vit-large-patch14) pads with <|endoftext|>, not 0; A1111 uses id_pad = id_end for
# SD1. (SD2's OpenCLIP pads with 0 -- not this model.) The text encoder's output at the pad positions is used by the
# UNet's cross-attention, so this matters for the images.
PAD = EOS
CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
VOCAB_SIZE = 49408
COMMA = 267  # ",</w>", used by A1111's chunking

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48,894: merge lines 1 .. 48,894 of the file (line 0 is a header)

# Letters and digits added in Unicode 17.0, unknown to the Oniguruma tables of tokenizers 0.23 (which treat them
# as unassigned, i.e. "other"); the Python regex module classifies them as \p{L} / \p{N}.
_L17 = (
    r"\x{088F}\x{0C5C}\x{0CDC}\x{A7CE}-\x{A7CF}\x{A7D2}\x{A7D4}\x{A7F1}\x{10940}-\x{10959}\x{10EC5}-\x{10EC7}"
    r"\x{11DB0}-\x{11DDB}\x{16EA0}-\x{16EB8}\x{16EBB}-\x{16ED3}\x{16FF2}-\x{16FF3}\x{187F8}-\x{187FF}"
    r"\x{18D09}-\x{18D1E}\x{18D80}-\x{18DF2}\x{1E6C0}-\x{1E6DE}\x{1E6E0}-\x{1E6E2}\x{1E6E4}-\x{1E6E5}"
    r"\x{1E6E7}-\x{1E6ED}\x{1E6F0}-\x{1E6F4}\x{1E6FE}-\x{1E6FF}\x{2B73A}-\x{2B73F}\x{2CEA2}-\x{2CEAD}"
    r"\x{323B0}-\x{33479}"
)
_N17 = r"\x{11DE0}-\x{11DE9}\x{16FF4}-\x{16FF6}"

# The CLIP pre-tokenisation regex (reference: regex module, IGNORECASE):
#   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
_PATTERN = (
    r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    rf"|[\p{{L}}{_L17}]+|[\p{{N}}{_N17}]|[^\s\p{{L}}\p{{N}}{_L17}{_N17}]+"
)

# The reference collapses whitespace with the regex module's \s (Unicode White_Space). The re module's \s is
# str.isspace(), which also has U+001C..U+001F; leave those out.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> symbol: printable Latin-1 bytes map to themselves, the other 68 to chr(256 + k) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    k = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + k)
            k += 1
    # Dict order is the vocabulary order of ids 0..255: the printable bytes first, then the others.
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def clean_text(text: str) -> str:
    """The reference clean-up: ftfy, HTML unescape twice, strip, whitespace collapse, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _pre_tokenizer_text(cleaned: str) -> str:
    # U+0345 matches no alternative of the reference regex (IGNORECASE makes it neither \p{L} nor [^\p{L}...]);
    # like whitespace it only separates pre-tokens. Oniguruma would treat it as a letter.
    return cleaned.replace("\u0345", " ")


class _BPEData:
    """The expensive part, built once per process: vocabulary, merges and the Rust tokenizer."""

    def __init__(self) -> None:
        raw = importlib.resources.files("sd15.clip").joinpath(_BPE_FILE).read_bytes()
        lines = gzip.decompress(raw).decode("utf-8").split("\n", _NUM_MERGES + 1)[1 : _NUM_MERGES + 1]
        merges = [tuple(line.split(" ")) for line in lines]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{_BPE_FILE}: unexpected format")
        symbols = list(bytes_to_unicode().values())
        tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != VOCAB_SIZE:
            raise ValueError(f"{_BPE_FILE}: {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
        self.tokens: list[str] = tokens
        self.vocab: dict[str, int] = vocab
        self.merges: list[tuple[str, str]] = merges

        rust = _RustTokenizer(
            models.BPE(vocab=dict(vocab), merges=merges, end_of_word_suffix="</w>", ignore_merges=False)
        )
        # Keep the regex matches, drop what lies between them (whitespace).
        self.split = pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True)
        rust.pre_tokenizer = pre_tokenizers.Sequence(
            [self.split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        # No normalizer (the clean-up is done in Python), no post-processor, no added tokens.
        self.rust = rust


@functools.lru_cache(maxsize=1)
def _bpe_data() -> _BPEData:
    return _BPEData()


class Tokenizer:
    """CLIP BPE tokenizer. ``Tokenizer()`` is free; the BPE tables (about 0.15 s to build) are built on first use
    and shared by every instance in the process."""

    bos_id = BOS
    eos_id = EOS
    pad_id = PAD  # = EOS for SD 1.5, see PAD
    context_length = CONTEXT_LENGTH

    def __init__(self) -> None:
        self._byte_decoder = {s: b for b, s in bytes_to_unicode().items()}

    @property
    def _rust(self):
        return _bpe_data().rust

    @property
    def _split(self):
        return _bpe_data().split

    @property
    def vocab(self) -> dict[str, int]:
        """token -> id, e.g. vocab[",</w>"] == 267; do not mutate."""
        return _bpe_data().vocab

    @property
    def tokens(self) -> list[str]:
        """id -> token."""
        return _bpe_data().tokens

    def __len__(self) -> int:
        return VOCAB_SIZE

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``, without BOS/EOS."""
        return self._encode_cleaned(_pre_tokenizer_text(clean_text(text)))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        cleaned = [_pre_tokenizer_text(clean_text(t)) for t in texts]
        plain = [i for i, t in enumerate(cleaned) if "<|" not in t]
        out: list[list[int] | None] = [None] * len(cleaned)
        for i, enc in zip(plain, self._rust.encode_batch([cleaned[i] for i in plain], add_special_tokens=False)):
            out[i] = enc.ids
        return [ids if ids is not None else self._encode_cleaned(cleaned[i]) for i, ids in enumerate(out)]

    def _encode_cleaned(self, text: str) -> list[int]:
        if "<|" not in text:  # no special token possible
            return self._rust.encode(text, add_special_tokens=False).ids
        # Special tokens: find the pre-tokens that the regex matched as special tokens, BPE the runs between them.
        ids: list[int] = []
        run: list[str] = []
        for piece, _ in self._split.pre_tokenize_str(text):
            special = self._special_id(piece)
            if special is None:
                run.append(piece)
                continue
            ids += self._encode_pieces(run)
            ids.append(special)
            run = []
        return ids + self._encode_pieces(run)

    def _encode_pieces(self, pieces: list[str]) -> list[int]:
        # The pieces are regex matches; splitting one again gives itself, so this is the BPE of each.
        if not pieces:
            return []
        return self._rust.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids

    @staticmethod
    def _special_id(piece: str) -> int | None:
        # Only the exact strings: the reference BPEs other case variants the regex matched ("<|ſtartoftext|>").
        if piece == BOS_TOKEN:
            return BOS
        if piece == EOS_TOKEN:
            return EOS
        return None

    def tokenize(self, texts: str | Sequence[str], length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor [B, length]: BOS, the ids truncated to length - 2, EOS, then PAD (= EOS).

        One window per text, as diffusers does; A1111's 75-token chunking is elsewhere.
        """
        if length < 2:
            raise ValueError("length must be >= 2 (BOS and EOS)")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for row, ids in enumerate(self.encode_batch(texts)):
            seq = [BOS, *ids[: length - 2], EOS]
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    __call__ = tokenize

    # -- lookup and decoding -------------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tokens[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (for debugging): ``</w>`` becomes a space; invalid UTF-8 becomes U+FFFD."""
        pieces: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i in (BOS, EOS):
                if not skip_special_tokens:
                    pieces.append(buf.decode("utf-8", errors="replace"))
                    buf.clear()
                    pieces.append(self.tokens[i] + " ")
                continue
            token = self.tokens[i]
            end = token.endswith("</w>")
            if end:
                token = token[: -len("</w>")]
            buf += bytes(self._byte_decoder[c] for c in token)
            if end:
                buf += b" "
        pieces.append(buf.decode("utf-8", errors="replace"))
        return "".join(pieces).strip()
