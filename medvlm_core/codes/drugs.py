"""Drug names as written (brands, salts, misspellings, with their strength) -> generic name and identifiers, offline.

The dictionary is the one the ``drug-named-entity-recognition`` package ships (MIT; built from DrugBank open data,
MeSH, MedlinePlus and Wikipedia: about 107,000 names and brand names of 20,000 drugs). Only its data file is read:
the package's own module is never imported (at import it builds an n-gram index of ~300 MB and reads a cache file in
the home folder, and its RxNorm/OMOP lookups call an online API: not available offline, and RxNorm itself needs a
UMLS licence). Loaded once per process (``drug_dictionary()``: about 0.6 s and 50 MB).

A name is looked up, in order, as written; through ``abbreviations.DRUG_ABBREVIATIONS`` (HCTZ, ASA, KCl); without
its strength, dosage form and release words (``Metformin 500 mg ER tab``); without salt words (``hydrochloride``,
``HCl``, ``sodium``); as its longest run of words that is a drug name; as the parts of a combination
(``lisinopril/HCTZ``); and last by spelling (rapidfuzz ratio >= 85 against the names with the same first letter).
"""

from __future__ import annotations

import bz2
import pickle
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from medvlm_core.codes import abbreviations as ab

DICTIONARY = "drug-named-entity-recognition"
FUZZY_CUTOFF = 85.0
_PLACEHOLDERS = frozenset({"", "not stated", "none", "n a", "na", "unknown", "not applicable", "nil", "null"})
_DOSE = re.compile(r"\b\d+(?:[.,]\d+)?\s*(?:mg|mcg|ug|g|gm|ml|l|units?|iu|meq|mmol|%|mg ml|tabs?|caps?)?\b")
_FORM_WORDS = frozenset({
    "tab", "tabs", "tablet", "tablets", "cap", "caps", "capsule", "capsules", "solution", "soln", "susp", "suspension",
    "syrup", "elixir", "injection", "inj", "injectable", "cream", "ointment", "oint", "gel", "lotion", "patch",
    "patches", "inhaler", "inh", "hfa", "mdi", "neb", "nebulizer", "spray", "drops", "drop", "suppository", "supp",
    "powder", "pen", "vial", "er", "xr", "xl", "sr", "cr", "dr", "la", "ec", "odt", "ir", "extended", "delayed",
    "release", "immediate", "sustained", "controlled", "oral", "po", "iv", "im", "sc", "subq", "sq", "sl", "pr", "top",
    "topical", "daily", "bid", "tid", "qid", "qhs", "prn", "nightly", "once", "twice", "mg", "mcg", "ml", "units",
    "unit", "ds", "ss", "forte", "chewable", "film", "coated", "enteric", "kit", "dose", "doses", "per", "every", "day",
})
_SALT_WORDS = frozenset({
    "hydrochloride", "hcl", "hydrobromide", "hbr", "sodium", "potassium", "calcium", "magnesium", "besylate",
    "maleate", "mesylate", "tartrate", "succinate", "sulfate", "sulphate", "citrate", "fumarate", "acetate",
    "bromide", "phosphate", "dihydrate", "monohydrate", "trihydrate", "hyclate", "bitartrate", "disodium",
    "dipropionate", "propionate", "furoate", "xinafoate", "valerate", "sodium dr", "anhydrous", "base", "salt",
})
_COMBINATION = re.compile(r"\s*(?:/|\+|\band\b|\bwith\b|\s-\s)\s*")


@dataclass(frozen=True)
class DrugMatch:
    """A drug name resolved: the generic name, its identifiers and how it was found."""

    query: str
    generic_name: str
    drugbank_id: str | None
    mesh_id: str | None
    medline_plus_id: str | None
    score: float
    match: str  # exact, abbreviation, stripped, salt, words, combination, fuzzy


def normalize(text: str) -> str:
    """Lowercase words separated by single spaces; ``/``, ``+`` and ``-`` kept (combinations).

    Args:
        text: a drug name as written.

    Returns:
        The normalised name.
    """
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").casefold()
    text = re.sub(r"[^0-9a-z/+.%\- ]+", " ", text)
    text = re.sub(r"(?<![0-9])\.|\.(?![0-9])", " ", text)  # dots, but not decimal points
    return " ".join(text.split())


def _generic(name: str) -> str:
    # "insulin aspart (rdna origin)" -> "insulin aspart": the manufacturing note is not part of the name
    return " ".join(re.sub(r"\([^)]*\)", " ", name).split())


class DrugDictionary:
    """The offline drug dictionary (use ``drug_dictionary()``: loaded once per process)."""

    def __init__(self) -> None:
        """Read the dictionary's data file from the installed package."""
        from importlib.util import find_spec
        from pathlib import Path

        from medvlm_core.codes.icd10cm import package_version

        # found, not imported: importing the package would build its own n-gram index (~300 MB) and read its
        # online lookups' cache from the home folder
        spec = find_spec("drug_named_entity_recognition")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the drug-named-entity-recognition package is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / "drug_ner_dictionary.pkl.bz2"
        with bz2.open(path, "rb") as f:
            # the package's own data file, as its own loader reads it (pickle is its format)
            data = pickle.load(f)
        self.package_version = package_version(DICTIONARY)
        #: The release recorded on every linked medication row.
        self.release = f"{DICTIONARY} {self.package_version} (DrugBank open data, MeSH, MedlinePlus, Wikipedia)"
        self._variants: dict[str, str] = {}
        for variant, canonicals in data["drug_variant_to_canonical"].items():
            if canonicals:
                self._variants[variant] = canonicals[0]
        self._data = {
            name: (d.get("drugbank_id"), d.get("mesh_id"), d.get("medline_plus_id"))
            for name, d in data["drug_canonical_to_data"].items()
        }
        by_letter: dict[str, list[str]] = {}
        for variant in self._variants:
            if len(variant) <= 40:
                by_letter.setdefault(variant[0], []).append(variant)
        self._by_letter = by_letter

    def _match(self, query: str, variant: str, score: float, how: str) -> DrugMatch:
        canonical = self._variants.get(variant, variant)
        drugbank, mesh, medline = self._data.get(canonical, (None, None, None))
        return DrugMatch(query, _generic(canonical), drugbank, mesh, medline, round(score, 4), how)

    def _exact(self, name: str) -> str | None:
        if name in self._variants:
            return name
        generic = ab.DRUG_ABBREVIATIONS.get(name)
        if generic and generic in self._variants:
            return generic
        return None

    def _curated(self, query: str, name: str) -> DrugMatch | None:
        """A name of the curated list (``abbreviations.DRUG_ABBREVIATIONS``): it wins over the dictionary, which
        maps a few brands to a drug class (Colace -> stool softeners)."""
        generic = ab.DRUG_ABBREVIATIONS.get(name)
        if not generic:
            return None
        if generic in self._variants:
            found = self._match(query, generic, 1.0, "abbreviation")
            return DrugMatch(query, found.generic_name, found.drugbank_id, found.mesh_id, found.medline_plus_id,
                             1.0, "abbreviation")
        parts = [self._exact(p) for p in _COMBINATION.split(generic) if p.strip()]
        first = self._match(query, parts[0], 1.0, "abbreviation") if parts and parts[0] else None
        return DrugMatch(query, generic, first.drugbank_id if first else None, first.mesh_id if first else None,
                         first.medline_plus_id if first else None, 0.95, "abbreviation")

    @lru_cache(maxsize=50_000)
    def lookup(self, text: str) -> DrugMatch | None:
        """The drug a name as written stands for (module docstring: the order names are tried in).

        Args:
            text: a medication name as the model extracted it (``Glucophage 500``, ``metformin HCl ER``).

        Returns:
            The match with a score from 0 to 1 (1: the name as written is in the dictionary), or None.
        """
        name = normalize(text)
        if name in _PLACEHOLDERS:
            return None
        words = [w for w in _DOSE.sub(" ", name).replace("-", " ").split() if w not in _FORM_WORDS]
        stripped = " ".join(words)
        unsalted = " ".join(w for w in words if w not in _SALT_WORDS)
        for candidate, score, how in ((name, 1.0, "exact"), (stripped, 0.98, "stripped")):
            curated = self._curated(text, candidate)
            if curated:
                return curated
            if unsalted != stripped and unsalted in self._data:
                # a generic name with its salt: the generic as written, not the dictionary's alias for the salt
                return self._match(text, unsalted, 0.97, "salt")
            if candidate in self._variants:
                return self._match(text, candidate, score, how)
        found = self._exact(unsalted) or self._curated(text, unsalted)
        if isinstance(found, DrugMatch):
            return found
        if found:
            return self._match(text, found, 0.97, "salt")
        for size in range(min(4, len(words)), 1, -1):  # the longest run of words that is a drug name
            for begin in range(len(words) - size + 1):
                run = " ".join(words[begin:begin + size])
                found = self._exact(run)
                if found:
                    return self._match(text, found, 0.95, "words")
        fuzzy = self._fuzzy(text, unsalted or stripped, whole=True)
        if fuzzy:
            return fuzzy
        for word in words:
            curated = self._curated(text, word)
            if curated:
                return curated
            found = self._exact(word)
            if found and len(found) > 3:
                return self._match(text, found, 0.95, "words")
        parts = [p for p in _COMBINATION.split(_DOSE.sub(" ", name)) if p.strip()]
        if len(parts) > 1:
            found_parts = [self.lookup(p) for p in parts]
            if all(found_parts):
                first = found_parts[0]
                generic = " / ".join(p.generic_name for p in found_parts)  # type: ignore[union-attr]
                score = min(p.score for p in found_parts) * 0.95  # type: ignore[union-attr]
                ids = (first.drugbank_id, first.mesh_id, first.medline_plus_id)  # type: ignore[union-attr]
                return DrugMatch(text, generic, *ids, round(score, 4), "combination")
        return self._fuzzy(text, unsalted or stripped, whole=False)

    def _fuzzy(self, text: str, name: str, whole: bool) -> DrugMatch | None:
        from rapidfuzz import fuzz, process

        if len(name) < 4:
            return None
        best: tuple[str, float] | None = None
        for candidate in [name] if whole else [w for w in name.split() if len(w) >= 5]:
            choices = self._by_letter.get(candidate[0], [])
            found = process.extractOne(candidate, choices, scorer=fuzz.ratio, score_cutoff=FUZZY_CUTOFF)
            if found and (best is None or found[1] > best[1]):
                best = (found[0], found[1])
        if best is None:
            return None
        return self._match(text, best[0], 0.9 * best[1] / 100.0, "fuzzy")


_LOADED: list[DrugDictionary] = []
_LOADING = threading.Lock()


def drug_dictionary() -> DrugDictionary:
    """The drug dictionary, loaded on first use and kept for the process (thread-safe).

    Returns:
        The dictionary.
    """
    if not _LOADED:
        with _LOADING:
            if not _LOADED:
                _LOADED.append(DrugDictionary())
    return _LOADED[0]
