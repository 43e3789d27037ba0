"""A little correct Turkish: the grammar and phrases the built-in synthetic tasks need.

Only what the tasks use, done right rather than broadly:

- numbers 1-10 as words (`number_word`);
- vowel harmony, two-way (-da/-de, -lar/-ler) and four-way (mı/mi/mu/mü) (`two_way_vowel`, `four_way_vowel`);
- the locative suffix with consonant assimilation after a voiceless final consonant (`locative`:
  sol → solda, üst → üstte, köşe → köşede, kitap → kitapta);
- Turkish casing, where dotted and dotless i are two letters (`tr_lower`, `tr_upper`, `tr_capitalize`);
- no plural after a numeral (`noun_phrase`: "iki kare", never "iki kareler");
- the captions, questions and answers of the shapes and digits tasks (`caption`, `count_question`, ...).

The shape/colour/region/side keys are the English words the generator uses ("circle", "red", "left", ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

NUMBERS: tuple[str, ...] = ("bir", "iki", "üç", "dört", "beş", "altı", "yedi", "sekiz", "dokuz", "on")

BACK_VOWELS = "aıouâû"  # â/û only occur in loanwords (kâr, mahkûm); treated as their plain back vowels
FRONT_VOWELS = "eiöüî"
VOICELESS_CONSONANTS = "fstkçşhp"  # "fıstıkçı şahap": after these a suffix's d turns into t

# Loanwords whose last vowel is back but which take front-vowel suffixes (saatte, kalpte, rolde).
FRONT_HARMONY_EXCEPTIONS = frozenset({"saat", "kalp", "hal", "rol", "gol", "alkol", "petrol", "sembol"})

COLOURS: dict[str, str] = {
    "red": "kırmızı", "blue": "mavi", "green": "yeşil", "yellow": "sarı", "purple": "mor", "orange": "turuncu",
}
SHAPES: dict[str, str] = {"circle": "daire", "square": "kare", "triangle": "üçgen", "star": "yıldız"}
# Region -> the noun whose locative names it (sol → solda "on the left").
REGIONS: dict[str, str] = {"left": "sol", "right": "sağ", "top": "üst", "bottom": "alt", "middle": "orta"}
YES, NO = "evet", "hayır"


# --- casing -------------------------------------------------------------------------------------------------

def tr_lower(text: str) -> str:
    """Lower-case Turkish text: I → ı and İ → i.

    `str.lower` maps I → i (wrong in Turkish) and İ → "i̇" (i plus a combining dot), so the two dotted/dotless
    pairs are mapped first and everything else is left to `str.lower`.
    """
    return text.replace("I", "ı").replace("İ", "i").lower()


def tr_upper(text: str) -> str:
    """Upper-case Turkish text: i → İ and ı → I (`str.upper` maps i → I)."""
    return text.replace("i", "İ").replace("ı", "I").upper()


def tr_capitalize(text: str) -> str:
    """Upper-case the first letter only ("istanbul'da" → "İstanbul'da"); the rest is kept as it is."""
    return tr_upper(text[:1]) + text[1:]


# --- vowel harmony ------------------------------------------------------------------------------------------

def last_vowel(word: str) -> str:
    """The last vowel of `word` (lower-cased the Turkish way); ValueError if it has none."""
    for char in reversed(tr_lower(word)):
        if char in BACK_VOWELS or char in FRONT_VOWELS:
            return char
    raise ValueError(f"{word!r} has no vowel, so vowel harmony cannot pick a suffix")


def _last_word(word: str) -> str:
    # Suffixes attach to the last word of a phrase ("sol üst" → "sol üstte").
    return tr_lower(word).split()[-1]


def takes_front_suffix(word: str) -> bool:
    """Whether suffixes on `word` take front vowels (e, i, ü): true after a front last vowel, and for a few
    loanwords that keep a front ("palatal") final consonant (saat → saatte)."""
    last = _last_word(word)
    return last in FRONT_HARMONY_EXCEPTIONS or last_vowel(last) in FRONT_VOWELS


def two_way_vowel(word: str) -> str:
    """The a/e of two-way harmony (-da/-de, -lar/-ler): "e" after a front last vowel, else "a"."""
    return "e" if takes_front_suffix(word) else "a"


def four_way_vowel(word: str) -> str:
    """The ı/i/u/ü of four-way harmony (the question particle mı/mi/mu/mü, -dı/-di/-du/-dü).

    Backness follows the last vowel, and so does roundness: a, ı → ı; e, i → i; o, u → u; ö, ü → ü.
    """
    vowel = last_vowel(_last_word(word))
    rounded = vowel in "oöuüû"
    if takes_front_suffix(word):
        return "ü" if rounded else "i"
    return "u" if rounded else "ı"


def ends_voiceless(word: str) -> bool:
    """Whether `word` ends in one of the voiceless consonants f s t k ç ş h p."""
    return _last_word(word)[-1:] in VOICELESS_CONSONANTS


# --- suffixes -----------------------------------------------------------------------------------------------

def locative(word: str, proper: bool = False) -> str:
    """`word` + the locative suffix -da/-de/-ta/-te ("in/at/on").

    The vowel follows two-way harmony; the consonant hardens to t after a voiceless final consonant.
    sol → solda, sağ → sağda, üst → üstte, alt → altta, orta → ortada, köşe → köşede, kitap → kitapta.
    Proper nouns take an apostrophe: locative("İstanbul", proper=True) → "İstanbul'da".
    """
    consonant = "t" if ends_voiceless(word) else "d"
    apostrophe = "'" if proper else ""
    return f"{word}{apostrophe}{consonant}{two_way_vowel(word)}"


def plural(word: str) -> str:
    """`word` + -lar/-ler (kare → kareler, üçgen → üçgenler, kitap → kitaplar).

    Not for use after a numeral: Turkish counts with the singular (see `noun_phrase`).
    """
    return f"{word}l{two_way_vowel(word)}r"


def question_particle(word: str) -> str:
    """The yes/no question particle that follows `word`, written apart: var → mı, yeşil → mi, yok → mu."""
    return f"m{four_way_vowel(word)}"


# --- numbers and noun phrases -------------------------------------------------------------------------------

def number_word(n: int) -> str:
    """1-10 as Turkish words: 1 → "bir", ..., 10 → "on"."""
    if not 1 <= n <= len(NUMBERS):
        raise ValueError(f"number_word covers 1-{len(NUMBERS)}, got {n}")
    return NUMBERS[n - 1]


def noun_phrase(noun: str, count: int, adjective: str | None = None) -> str:
    """A counted noun phrase, the noun always singular after a numeral.

    count 1 uses "bir" as the indefinite article, after the adjective: "kırmızı bir daire";
    more: numeral, adjective, singular noun: "iki mavi kare" (never "iki mavi kareler").
    """
    if count == 1:
        return f"{adjective} bir {noun}" if adjective else f"bir {noun}"
    words = [number_word(count), *([adjective] if adjective else []), noun]
    return " ".join(words)


def _join(phrases: Sequence[str], conjunction: str = "ve") -> str:
    # "A", "A ve B", "A, B ve C".
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + f" {conjunction} {phrases[-1]}"


# --- the synthetic tasks' sentences -------------------------------------------------------------------------

class ShapeGroupLike(Protocol):
    """What the sentence builders read from one group of identical shapes."""

    @property
    def shape(self) -> str: ...
    @property
    def colour(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def count(self) -> int: ...


def _subject(shape: str, count: int) -> str:
    # "Kare" for one square, "Kareler" for several: without a numeral the plural is right.
    noun = SHAPES[shape]
    return tr_capitalize(noun if count == 1 else plural(noun))


def where_word(region: str) -> str:
    """A region as a one-word locative answer: "left" → "solda", "top" → "üstte", "middle" → "ortada"."""
    return locative(REGIONS[region])


def caption(groups: Sequence[ShapeGroupLike], with_position: bool) -> str:
    """A one-sentence description of a scene.

    with_position: "Solda iki mavi kare, üstte kırmızı bir daire var."
    without:       "Resimde iki mavi kare ve kırmızı bir daire var."
    """
    phrases = [noun_phrase(SHAPES[g.shape], g.count, COLOURS[g.colour]) for g in groups]
    if with_position:
        located = [f"{where_word(g.region)} {phrase}" for g, phrase in zip(groups, phrases, strict=True)]
        return tr_capitalize(", ".join(located)) + " var."
    return f"Resimde {_join(phrases)} var."


def count_question(shape: str) -> str:
    """ "Resimde kaç daire var?" (singular after kaç, as after a numeral)."""
    return f"Resimde kaç {SHAPES[shape]} var?"


def colour_question(shape: str, count: int) -> str:
    """ "Kare ne renk?" / "Kareler ne renk?" """
    return f"{_subject(shape, count)} ne renk?"


def where_question(shape: str, count: int) -> str:
    """ "Üçgen nerede?" / "Üçgenler nerede?" """
    return f"{_subject(shape, count)} nerede?"


def exists_question(colour: str, shape: str) -> str:
    """ "Resimde kırmızı bir daire var mı?" """
    return f"Resimde {noun_phrase(SHAPES[shape], 1, COLOURS[colour])} var {question_particle('var')}?"


def digit_question(side: str) -> str:
    """ "Soldaki rakam hangisi?" / "Sağdaki rakam hangisi?" (locative + the adjective-forming -ki)."""
    return f"{tr_capitalize(locative(REGIONS[side]))}ki rakam hangisi?"


def yes_no(answer: bool) -> str:
    """ "evet" / "hayır" """
    return YES if answer else NO
