"""ICD-10-CM: the code set, checking a code, and a search over its descriptions and inclusion terms.

The code set is the CMS ICD-10-CM tabular list as the ``simple-icd-10-cm`` package ships it (MIT; its release is
``CodeSet.release``, recorded on every linked row). It is loaded once per process (``code_set()``): about 3-4 s
and 220 MB, 2 s of it the package parsing its XML.

The search ranks the categories and subcategories (the 7th-character extensions are checked, not searched: the
encounter they name is not in a diagnosis' wording) by how well their texts (the description, the inclusion terms
and the category's "includes" notes) cover the query's words and how few words of their own the query lacks:

* the query is read through the clinical abbreviation list (``abbreviations``: T2DM, HTN, CKD, afib, ...),
  a reading per meaning of an ambiguous abbreviation;
* words are compared in their search form (``text.stem``: plural, synonyms such as renal/kidney), in any order;
  a misspelt word the code set does not have is replaced by its nearest word of the code set (rapidfuzz);
* parenthesised words and words saying a detail is not given (``unspecified``, ``NOS``) are optional, so the
  unspecified code wins when the query gives no detail; words after ``without`` are neither required nor
  matched, and a query's ``with X`` must find ``X`` (``T2DM with CKD`` -> E11.22).

Score: coverage^2 x (0.6 + 0.4 x precision), where coverage is the share of the query's word weight (inverse
document frequency) the text has, and precision the share of the text's required word weight the query has; then
lowered for what needs saying to apply (``MARKED``: "Other ..." and secondary codes; pregnancy and newborn codes
and external causes unless the query names such a context) and for a "with"/"without" contradiction. Cost: about
1 ms a query (a vectorised first pass over the postings of the query's words, then the ``SHORTLIST`` scored
exactly).
"""

from __future__ import annotations

import re
import threading
import warnings
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from math import log
from typing import Iterable

import numpy as np

from medvlm_core.codes.text import Terms, code_text_terms, query_terms

CODE_SET = "ICD-10-CM"
_CODE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")
_RELEASE_FILE = re.compile(r"(January|February|March|April|May|June|July|August|September|October|November|"
                           r"December)-(\d{1,2})-(\d{4})")
SHORTLIST = 60  # texts scored exactly, after the vectorised first pass
# Words whose presence in a code's text marks a residual or secondary code: used only when the query says so.
MARKED = {"other": 0.92, "secondary": 0.85, "encounter": 0.85, "screening": 0.9}
# Chapters whose codes fit only a context the query must name (pregnancy, the newborn), and the external causes
# (how an injury happened: not a diagnosis).
_CONTEXT_CHAPTERS = {"15": 0.85, "16": 0.85, "20": 0.5}
_CONTEXT_WORDS = frozenset({"pregnancy", "pregnant", "gestational", "gestation", "obstetric", "trimester",
                            "puerperium", "puerperal", "postpartum", "delivery", "labor", "childbirth", "antepartum",
                            "maternal", "newborn", "neonatal", "neonate", "perinatal", "fetal", "fetu", "fetus",
                            "infant", "preterm", "birth", "fall", "accident", "collision", "struck", "bite", "assault"})


@dataclass(frozen=True)
class Candidate:
    """A ranked ICD-10-CM code for a query."""

    code: str
    description: str
    score: float
    billable: bool

    @property
    def category(self) -> str:
        """The code's category: its first three characters."""
        return self.code[:3]


@dataclass(frozen=True)
class CodeCheck:
    """Whether a code (as someone wrote it) is in the code set."""

    code: str
    normalized: str | None
    valid: bool
    billable: bool
    description: str | None


@dataclass
class _Entry:
    code: str
    description: str
    billable: bool
    chapter: str
    searchable: bool


class CodeSet:
    """The ICD-10-CM code set with its search index (use ``code_set()``: loaded once per process)."""

    def __init__(self) -> None:
        """Load the code set from the ``simple-icd-10-cm`` package and build the search index."""
        with warnings.catch_warnings():  # the package reads its data through a deprecated importlib API
            warnings.simplefilter("ignore", DeprecationWarning)
            import simple_icd_10_cm as cm
            from simple_icd_10_cm import simple_icd_10_cm as module

        self.package_version = package_version("simple-icd-10-cm")
        match = _RELEASE_FILE.search(getattr(module, "_classification_data_package_file_name", ""))
        date = f"{match.group(1)} {match.group(2)}, {match.group(3)}" if match else "unknown date"
        #: The release recorded on every linked row.
        self.release = f"{CODE_SET} {date} (simple-icd-10-cm {self.package_version})"
        self._entries: dict[str, _Entry] = {}
        self._chapters: dict[str, str] = {}
        texts: list[tuple[str, str]] = []
        chapter = ""
        for code in cm.get_all_codes(True):
            if cm.is_chapter(code):
                chapter = code
                self._chapters[code] = cm.get_description(code)
                continue
            if cm.is_block(code) and not cm.is_category_or_subcategory(code):
                continue  # (a block and a category may share a name: B20, the HIV block and its category)
            if code in self._entries:
                continue
            description = cm.get_description(code)
            searchable = not cm.is_extended_subcategory(code)
            self._entries[code] = _Entry(code, description, cm.is_leaf(code), chapter, searchable)
            if searchable:
                texts.append((code, description))
                texts += [(code, t) for t in cm.get_inclusion_term(code)]
                texts += [(code, t) for t in cm.get_includes(code)]
        self._no_dots = {code.replace(".", ""): code for code in self._entries}
        self._build_index(texts)

    # -- the index -------------------------------------------------------------------------------------------
    def _build_index(self, texts: list[tuple[str, str]]) -> None:
        vocabulary: dict[str, int] = {}
        postings: list[list[int]] = []
        self._text_code: list[str] = []
        self._text_terms: list[Terms] = []
        self._code_texts: dict[str, list[int]] = {}
        for number, (code, text) in enumerate(texts):
            terms = code_text_terms(text)
            self._code_texts.setdefault(code, []).append(number)
            self._text_code.append(code)
            self._text_terms.append(terms)
            for term in terms.required | terms.optional:
                index = vocabulary.setdefault(term, len(vocabulary))
                if index == len(postings):
                    postings.append([])
                postings[index].append(number)
        count = len(texts)
        self._vocabulary = vocabulary
        self._words = list(vocabulary)
        self._postings = [np.asarray(p, dtype=np.int32) for p in postings]
        self._idf = {term: log(1.0 + count / len(postings[i])) for term, i in vocabulary.items()}
        # the weight of each text's required words: the first pass's estimate of what a match leaves over
        self._required_weight = np.asarray(
            [sum(self._idf[t] for t in terms.required) for terms in self._text_terms], dtype=np.float64)
        self._sorted_leaves = sorted(c for c, e in self._entries.items() if e.billable and e.searchable)

    def _weight(self, term: str) -> float:
        # a word the code set does not have weighs like its rarest words: a query full of them matches little
        return self._idf.get(term, log(1.0 + len(self._text_code)))

    @lru_cache(maxsize=50_000)
    def _nearest_word(self, term: str) -> str:
        """A word the code set lacks -> its closest word of the code set within a few edits (the more common
        one of equally close words), or the word itself."""
        if term in self._vocabulary or len(term) < 5 or not term.isalpha():
            return term
        from rapidfuzz import fuzz, process
        from rapidfuzz.distance import DamerauLevenshtein

        allowed = 1 if len(term) <= 5 else 2 if len(term) < 10 else 3
        close = [(DamerauLevenshtein.distance(term, word), -len(self._postings[self._vocabulary[word]]), word)
                 for word, _, _ in process.extract(term, self._words, scorer=fuzz.ratio, limit=10, score_cutoff=60)]
        close = [c for c in close if c[0] <= allowed]
        return min(close)[2] if close else term

    def _corrected(self, terms: Terms) -> Terms:
        return Terms(frozenset(self._nearest_word(t) for t in terms.required), terms.optional,
                     frozenset(self._nearest_word(t) for t in terms.negated))

    def _score(self, query: Terms, text: Terms) -> float:
        total = sum(self._weight(t) for t in query.required)
        if not total:
            return 0.0
        matched = sum(self._weight(t) for t in query.required if t in text.required or t in text.optional)
        own = sum(self._weight(t) for t in text.required)
        extra = sum(self._weight(t) for t in text.required if t not in query.required)
        coverage = matched / total
        precision = 1.0 - extra / own if own else 1.0
        score = coverage * coverage * (0.6 + 0.4 * precision)
        if query.negated & text.required:  # the query says without what the text has
            score *= 0.7
        if query.required & text.negated:  # the text says without what the query has
            score *= 0.5
        return score

    def _shortlist(self, query: Terms) -> list[int]:
        arrays = [(self._postings[self._vocabulary[t]], self._weight(t))
                  for t in query.required if t in self._vocabulary]
        if not arrays:
            return []
        ids = np.unique(np.concatenate([a for a, _ in arrays]))
        matched = np.zeros(len(ids), dtype=np.float64)
        for posting, weight in arrays:
            matched[np.isin(ids, posting, assume_unique=True)] += weight
        estimate = matched - 0.3 * np.maximum(self._required_weight[ids] - matched, 0.0)
        if len(ids) > SHORTLIST:
            top = np.argpartition(-estimate, SHORTLIST)[:SHORTLIST]
            ids = ids[top]
        return ids.tolist()

    # -- public ----------------------------------------------------------------------------------------------
    def search(self, text: str, top: int = 5) -> list[Candidate]:
        """The ``top`` codes whose texts best match a diagnosis as written, best first.

        Args:
            text: the diagnosis (``T2DM``, ``CKD stage 3``, ``afib with RVR``).
            top: how many candidates.

        Returns:
            Candidates with a score from 0 to 1 (1: every word of the query and no other required word); a
            category without billable codes of its own gives way to its child with the same score. Empty when
            no word matches.
        """
        best: dict[str, float] = {}
        for rank, reading in enumerate(query_terms(text)):
            query = self._corrected(reading)
            preference = 1.0 - 0.03 * rank  # later readings of an ambiguous abbreviation rank a little lower
            in_context = bool(query.required & _CONTEXT_WORDS)
            for number in self._shortlist(query):
                score = self._score(query, self._text_terms[number]) * preference
                code = self._text_code[number]
                if not in_context:
                    score *= _CONTEXT_CHAPTERS.get(self._entries[code].chapter, 1.0)
                if score > best.get(code, 0.0):
                    best[code] = score
        def order(item: tuple[str, float]) -> tuple:
            entry = self._entries[item[0]]
            return (-round(item[1], 6), not entry.billable, "unspecified" not in entry.description.lower(),
                    len(entry.description), item[0])

        ranked = sorted(best.items(), key=order)
        out: list[Candidate] = []
        for code, score in ranked:
            if score <= 0:
                break
            if any(c.code.startswith(code) and c.score >= score - 1e-9 for c in out):
                continue  # a parent that scores no better than a child already listed
            entry = self._entries[code]
            out.append(Candidate(code, entry.description, round(min(score, 1.0), 4), entry.billable))
            if len(out) >= top:
                break
        return out

    def billable_choice(self, candidate: Candidate, text: str) -> Candidate:
        """The billable code to use for a candidate: itself, or its best-matching billable descendant.

        Args:
            candidate: a ranked candidate.
            text: the query it was found for.

        Returns:
            The candidate when billable; else the descendant whose texts match ``text`` best (ties: the shorter
            description), or the candidate itself when it has none.
        """
        if candidate.billable:
            return candidate
        prefix = candidate.code
        start = bisect_left(self._sorted_leaves, prefix)
        leaves = []
        for code in self._sorted_leaves[start:]:
            if not code.startswith(prefix):
                break
            leaves.append(self._entries[code])
        if not leaves:
            return candidate
        readings = [self._corrected(r) for r in query_terms(text)]

        def fit(entry: _Entry) -> float:
            terms = code_text_terms(entry.description)
            return max(self._score(r, terms) for r in readings)

        chosen = max(leaves, key=lambda e: (round(fit(e), 6), -len(e.description), [-ord(ch) for ch in e.code]))
        return Candidate(chosen.code, chosen.description, candidate.score, True)

    def code_score(self, code: str, text: str) -> float:
        """How well one code's texts match a diagnosis as written (the search's score, for any code).

        Args:
            code: a dotted code of the code set.
            text: the diagnosis.

        Returns:
            The score from 0 to 1 (0 for a code that is not searched, such as a 7th-character extension).
        """
        numbers = self._code_texts.get(code, [])
        readings = [self._corrected(r) for r in query_terms(text)]
        best = max((self._score(r, self._text_terms[n]) for r in readings for n in numbers), default=0.0)
        return round(min(best, 1.0), 4)

    def check(self, code: str) -> CodeCheck:
        """Whether a code as written is an ICD-10-CM code (dots, case and spaces do not matter).

        Args:
            code: the code (``E11.9``, ``e119``).

        Returns:
            The check: its dotted form, whether it exists, is billable, and its description.
        """
        compact = re.sub(r"[\s.]", "", str(code or "")).upper()
        dotted = self._no_dots.get(compact)
        if dotted is None or not _CODE.match(dotted):
            return CodeCheck(str(code), None, False, False, None)
        entry = self._entries[dotted]
        return CodeCheck(str(code), dotted, True, entry.billable, entry.description)

    def chapter(self, code: str) -> str | None:
        """The chapter of a code, as ``NN Title (range)`` (``04 Endocrine, nutritional and metabolic ...``).

        Args:
            code: a valid code (dotted).

        Returns:
            The chapter, or None for an unknown code.
        """
        entry = self._entries.get(code)
        if entry is None:
            return None
        return f"{int(entry.chapter):02d} {self._chapters[entry.chapter]}"

    def descriptions(self, codes: Iterable[str]) -> dict[str, str]:
        """Descriptions of codes (unknown ones left out).

        Args:
            codes: dotted codes.

        Returns:
            Code -> description.
        """
        return {c: self._entries[c].description for c in codes if c in self._entries}


def package_version(distribution: str) -> str:
    """The installed version of a package (``unknown`` when it has no metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


_LOADED: list[CodeSet] = []
_LOADING = threading.Lock()


def code_set() -> CodeSet:
    """The ICD-10-CM code set, loaded on first use and kept for the process (thread-safe).

    Returns:
        The code set.
    """
    if not _LOADED:
        with _LOADING:
            if not _LOADED:
                _LOADED.append(CodeSet())
    return _LOADED[0]
