"""Text normalization for phrase matching: one character in, a (possibly empty) string out.

Banned phrases are matched on normalized text, and the same per-character mapping is applied to the phrases,
to the text of every vocabulary token and to the decoded output, so that matching never depends on where the
token boundaries fall. The mapping is a pipeline over one character:

  1. ``nfkc``: Unicode NFKC (full-width letters, ligatures, circled digits, ... become their plain form);
  2. ``casefold``: Unicode case folding (``"ß"`` -> ``"ss"``);
  3. ``lookalikes``: ``0 -> o``, ``1 / l / i -> i``, ``3 -> e``, ``4 -> a``, ``5 -> s``, ``@ -> a``, ``$ -> s``
     (before step 4, so that ``@`` and ``$`` survive as letters);
  4. ``skip_separators``: drop everything that is not a letter or a number (Unicode categories L* and N*):
     spaces, punctuation, symbols, controls, zero-width characters and combining marks.

With ``skip_separators`` the spaces of a phrase vanish too, so ``"bad word"`` matches ``"b.a-d w o r d"``
but also ``"badword"``, and ``"the rapist"`` matches inside ``"therapist"``: word boundaries are not
preserved. Choose phrases with that in mind (or turn the flag off, which keeps spaces significant).

NFKC is applied per character, not to the whole string: a decomposed sequence (``"e" + U+0301``) is not
composed into ``"é"``; with ``skip_separators`` its combining mark is dropped and it reads as ``"e"``.
Defining `normalize` as the concatenation of `char_class` is what makes a token's normalized text a function
of the token alone.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata

# Characters that stand in for letters. The "1 / l / i" class is spelled "i".
_LOOKALIKES = {"0": "o", "1": "i", "l": "i", "3": "e", "4": "a", "5": "s", "@": "a", "$": "s"}


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Which normalizations phrase matching applies (see the module docstring). Frozen and hashable.

    Attributes:
      casefold: fold case.
      nfkc: apply Unicode NFKC to each character.
      skip_separators: drop every character that is not a letter or a number.
      lookalikes: map look-alike digits and symbols to letters.
    """

    casefold: bool = True
    nfkc: bool = True
    skip_separators: bool = True
    lookalikes: bool = True

    def char_class(self, ch: str) -> str:
        """The normalized form of one character: a string, '' when the character is skipped."""
        return _char_class(self, ch)

    def normalize(self, text: str) -> str:
        """The normalized text: the concatenation of `char_class` over its characters."""
        return "".join(_char_class(self, ch) for ch in text)


@functools.lru_cache(maxsize=1 << 16)
def _char_class(norm: Normalization, ch: str) -> str:
    s = unicodedata.normalize("NFKC", ch) if norm.nfkc else ch
    if norm.casefold:
        s = s.casefold()
    if norm.lookalikes:
        s = "".join(_LOOKALIKES.get(c, c) for c in s)
    if norm.skip_separators:
        s = "".join(c for c in s if unicodedata.category(c)[0] in "LN")
    return s
