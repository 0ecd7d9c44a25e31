"""Pure text functions used by ingest: cleaning and sentence splitting (English and Chinese).

Reads and writes nothing.

>>> split_sentences("Mr. Smith went home. He slept.")
['Mr. Smith went home.', 'He slept.']
>>> split_sentences("今天下雨了。我们不出去！好吗？")
['今天下雨了。', '我们不出去！', '好吗？']
"""

from __future__ import annotations

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
_KEEP_CONTROLS = {"\n", "\t"}

# A sentence ends at . ! ? (and closing quotes/brackets after them) followed by whitespace and an
# upper-case letter, digit or opening quote; or at Chinese 。！？ (plus closers) with no space needed.
_EN_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_ZH_END = re.compile(r"[。！？]+[”’」』）》]*|[!?]+[”’」』）]*(?=[\u3400-\u9fff])")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc e.g i.e no fig gen col lt sgt capt rev hon mt ft jan feb mar apr "
    "jun jul aug sep sept oct nov dec inc ltd co corp u.s u.k a.m p.m approx".split()
)


def clean_text(text: str) -> str:
    """NFC-normalise, drop control/format characters, collapse whitespace within each line."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(ch for ch in text if ch in _KEEP_CONTROLS or unicodedata.category(ch) not in ("Cc", "Cf"))
    lines = (_WHITESPACE.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences at English and Chinese sentence-final punctuation."""
    cuts = sorted({m.end() for m in _ZH_END.finditer(paragraph)} |
                  {m.end() for m in _EN_END.finditer(paragraph) if not _is_abbreviation(paragraph, m.start())})
    sentences, start = [], 0
    for cut in cuts + [len(paragraph)]:
        piece = paragraph[start:cut].strip()
        if piece:
            sentences.append(piece)
        start = cut
    return sentences


def _is_abbreviation(text: str, dot: int) -> bool:
    """True when the '.' at ``dot`` closes an abbreviation or an initial (``J.``), not a sentence."""
    if text[dot] != ".":
        return False
    word = text[:dot].rsplit(None, 1)[-1] if text[:dot].strip() else ""
    word = word.lstrip("\"'“‘([").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def document_sentences(document: str) -> list[str]:
    """Sentences of a cleaned document, whose lines are paragraphs."""
    return [sentence for paragraph in document.split("\n") for sentence in split_sentences(paragraph)]
