"""Clinical text to search terms: normalisation, light stemming, abbreviations, and the with/without qualifiers.

The code set's texts and the queries go through the same steps (normalise, split, synonyms, stem), so a word
matches whatever way either side writes it; queries first go through the abbreviation list
(``abbreviations.ABBREVIATIONS``) and the context rules. A text's words fall in three groups:

* required: the words that say what it is (``type 2 diabetes mellitus``);
* optional: words in parentheses or brackets (``Essential (primary) hypertension``), and words that only say a
  detail is not given (``unspecified``, ``NOS``, ``site not specified``);
* negated: the words after ``without`` (``... without complications``; in a query also after ``no``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

from medvlm_core.codes import abbreviations as ab

STOPWORDS = frozenset({"of", "the", "a", "an", "and", "or", "in", "on", "to", "for", "due", "by", "at", "is", "as",
                       "from", "than", "into", "its", "be", "being", "also", "this", "that", "following",
                       "involving", "associated", "related", "s"})
# Words that only say that a detail is not given: neither required nor a penalty when a query lacks them.
NEUTRAL = frozenset({"unspecified", "nos", "elsewhere", "classified", "not", "site", "organism", "specified",
                     "mellitus", "uncomplicated", "mention", "single", "episode", "stated", "native", "nontraumatic",
                     "unknown", "type", "nonspecific", "acquired", "primary", "essential"})
WITH = frozenset({"with", "w"})
# ``X without Y in remission``: what follows ``in`` is no longer what the text is without.
_ENDS_NEGATION = frozenset({"in", "but"})
WITHOUT = frozenset({"without", "no", "wo"})
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4", "v": "5"}
_ROMAN_AFTER = frozenset({"type", "stage", "class", "grade", "degree", "dm"})
_SPLIT = re.compile(r"^([a-z]{2,})(\d+[a-z]?)$")
_NOT_WORD = re.compile(r"[^0-9a-z]+")
_POSSESSIVE = re.compile(r"['\u2019]s\b")
_CLAUSE = re.compile(r"[,;]")
_NESTED = re.compile(r"[\(\[]([^\(\)\[\]]*)[\)\]]")
MAX_VARIANTS = 4


def normalize(text: str) -> str:
    """Lowercase ASCII-ish words separated by single spaces (``Crohn's`` -> ``crohn``, ``a-fib`` -> ``a fib``).

    Args:
        text: any text.

    Returns:
        The normalised text.
    """
    text = _POSSESSIVE.sub("", str(text).casefold())
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return " ".join(_NOT_WORD.sub(" ", text).split())


@lru_cache(maxsize=200_000)
def stem(word: str) -> str:
    """A word's search form: its synonym (``renal`` -> ``kidney``), then a plural ``s`` dropped.

    Args:
        word: a normalised word.

    Returns:
        The search form (the same for ``ulcers``, ``ulcer`` and ``ulceration``).
    """
    word = ab.TOKEN_SYNONYMS.get(word, word)
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "ys")):
        word = word[:-1]
    return ab.TOKEN_SYNONYMS.get(word, word)


def _words(text: str) -> list[str]:
    words = normalize(text).split()
    out: list[str] = []
    for i, word in enumerate(words):
        if word in _ROMAN and i > 0 and words[i - 1] in _ROMAN_AFTER:
            word = _ROMAN[word]
        out.append(word)
    return out


def _clauses(text: str) -> list[str | None]:
    """A text's words with None where a comma or semicolon ends a clause (``without`` reaches no further)."""
    out: list[str | None] = []
    for clause in _CLAUSE.split(text):
        if out:
            out.append(None)
        out += _words(clause)
    return out


@dataclass(frozen=True)
class Terms:
    """A text's search terms (stemmed words, stopwords left out), by group (module docstring)."""

    required: frozenset[str]
    optional: frozenset[str]
    negated: frozenset[str]

    @property
    def all(self) -> frozenset[str]:
        """Every term, whatever its group."""
        return self.required | self.optional | self.negated


def _grouped(words: list[str | None], optional_words: set[int], neutral: frozenset[str],
             ignored: frozenset[str] = frozenset()) -> Terms:
    required: set[str] = set()
    optional: set[str] = set()
    negated: set[str] = set()
    negating = False
    for i, word in enumerate(words):
        if word is None or word in WITH or word in _ENDS_NEGATION:
            negating = False
            continue
        if word in WITHOUT:
            negating = True
            continue
        if word in STOPWORDS or word in ignored:
            continue
        term = stem(word)
        if negating:
            negated.add(term)
        elif i in optional_words or word in neutral or term in neutral:
            optional.add(term)
        else:
            required.add(term)
    negated -= required
    return Terms(frozenset(required), frozenset(optional - required - negated), frozenset(negated))


def code_text_terms(text: str) -> Terms:
    """The terms of one of the code set's texts (a description, an inclusion term).

    Args:
        text: the text as the code set writes it.

    Returns:
        Its terms: parenthesised words and neutral words optional, words after ``without`` negated.
    """
    optional_spans = [m.span(1) for m in _NESTED.finditer(text)]
    words: list[str | None] = []
    optional_words: set[int] = set()
    position = 0
    for start, end in optional_spans + [(len(text), len(text))]:
        words += _clauses(text[position:start])
        inner = _clauses(text[start:end])
        optional_words.update(range(len(words), len(words) + len(inner)))
        words += inner
        position = end
    return _grouped(words, optional_words, NEUTRAL)


def _split_attached(words: list[str | None]) -> list[str | None]:
    """``ckd3`` -> ``ckd 3`` when ``ckd`` is an abbreviation and ``ckd3`` is not."""
    out: list[str | None] = []
    for word in words:
        match = _SPLIT.match(word) if word else None
        if match and word not in ab.ABBREVIATIONS and match.group(1) in ab.ABBREVIATIONS:
            out += [match.group(1), match.group(2)]
        else:
            out.append(word)
    return out


def expansions(text: str) -> list[list[str | None]]:
    """The ways a query reads, as word lists, its abbreviations expanded (longest phrase first; an ambiguous one
    in each of its meanings, the first meaning first; at most ``MAX_VARIANTS``), then the words as written (a lay
    term the list rewrites may be the code set's own inclusion term: "fainting" is one of R55's).

    Args:
        text: the query as written.

    Returns:
        Word lists (None where a clause ends), the preferred reading first.
    """
    words = _split_attached(_clauses(text))
    pieces: list[list[list[str | None]]] = []
    i = 0
    while i < len(words):
        for n in range(min(4, len(words) - i), 0, -1):
            if None in words[i:i + n]:
                continue
            phrase = " ".join(words[i:i + n])  # type: ignore[arg-type]
            meanings = ab.ABBREVIATIONS.get(phrase)
            if meanings and (phrase not in ab.WHOLE_QUERY_ONLY or len(words) == n):
                pieces.append([_words(m) for m in meanings])
                i += n
                break
        else:
            pieces.append([[words[i]]])
            i += 1
    variants: list[list[str | None]] = []
    for choice in product(*pieces):
        variants.append([w for part in choice for w in part])
        if len(variants) >= MAX_VARIANTS:
            break
    if words not in variants:  # the words as written, last: a lay term may be the code set's own
        variants.append(words)
    return variants or [[]]


def apply_rules(words: list[str | None]) -> list[str | None]:
    """The context rules (``abbreviations.CONTEXT_RULES``) applied to a query's words.

    Args:
        words: the query's words (abbreviations expanded).

    Returns:
        The words with the rules' additions and removals.
    """
    def present_in(ws: list[str | None]) -> set[str]:
        return {stem(w) for w in ws if w} | {w for w in ws if w}

    present = present_in(words)
    for when, unless, add, drop in ab.CONTEXT_RULES:
        if {stem(w) for w in when} <= present and not ({stem(w) for w in unless} | unless) & present:
            words = [w for w in words if w not in drop] + [None, "with"] * bool(add) + list(add)
            present = present_in(words)
    return words


def query_terms(text: str) -> list[Terms]:
    """The search terms of a query, one ``Terms`` per reading (``expansions``), rules applied.

    Args:
        text: the query as written (a diagnosis as the model extracted it).

    Returns:
        The readings' terms, the preferred first; a query's optional group is empty.
    """
    out: list[Terms] = []
    for words in expansions(text):
        terms = _grouped(apply_rules(words), set(), frozenset(), ab.IGNORED_WORDS)
        if terms not in out:
            out.append(terms)
    return out
