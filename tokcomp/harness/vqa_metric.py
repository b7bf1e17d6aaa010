"""The official VQA accuracy (Antol et al., ICCV 2015; Goyal et al., CVPR 2017), as the VQAv2
evaluation script (GT-Vision-Lab/VQA, vqaEval.py at c4e6a0e, its Python 3 version; the Python 2
one before it has curly apostrophes in most contractions and another punctuation list) computes
it, written from its description.

Normalisation. The prediction: newlines and tabs become spaces, then the text is stripped,
punctuation is processed, and word by word it is lowercased, number words become digits
("none" and "zero" are 0), articles are dropped and apostrophe-less contractions get their
apostrophe back ("dont" -> "don't"). The human answers: punctuation only, and only when the
humans disagree (the annotation files hold answers already normalised by the same rules).

Punctuation, as the official code does it, quirks included: each character of PUNCTUATION is
deleted when it touches a space anywhere in the text, or when the text holds a comma between
two digits ("1,000" -> "1000": then every punctuation character is deleted); otherwise it
becomes a space ("black/white" -> "black white"). Then periods not followed by a digit are
deleted ("yes." -> "yes", "3.5" stays), at most 32 of them (the official call passes
re.UNICODE, 32, where `re.sub` takes its count). Apostrophes, colons and the other characters
not listed are kept.

Accuracy of one question with N >= 10 human answers: for each human, min(1, matches among the
other N - 1 / 3); the mean over the N humans (so 3 agreeing humans -> 0.9, 4 or more -> 1).
With fewer than CONSENSUS answers (single-answer datasets such as easy-VQA) the consensus rule
has no meaning; the rule here is exact match: 1 when the normalised prediction equals any
answer normalised the same way (punctuation and words), else 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Human answers per question in VQAv2; with fewer, accuracy is exact match.
CONSENSUS = 10
#: Humans that must agree with a prediction for full credit.
AGREEING = 3


def _pairs(text: str) -> dict[str, str]:
    """'key value key value ...' -> {key: value}."""
    words = text.split()
    return dict(zip(words[::2], words[1::2], strict=True))


#: The characters the punctuation step deletes or turns into spaces.
PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
NUMBER_WORDS = _pairs(
    "none 0 zero 0 one 1 two 2 three 3 four 4 five 5 six 6 seven 7 eight 8 nine 9 ten 10"
)
ARTICLES = frozenset({"a", "an", "the"})

#: The official contraction table, entries as they are (keys with capitals never match, since
#: words are lowercased first; "somebody'd" maps to "somebodyd" there too).
CONTRACTIONS = _pairs("""
    aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't
    couldn'tve couldn't've  couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't
    hadnt hadn't  hadnt've hadn't've  hadn'tve hadn't've  hasnt hasn't  havent haven't
    hed he'd  hed've he'd've  he'dve he'd've  hes he's  howd how'd  howll how'll  hows how's
    Id've I'd've  I'dve I'd've  Im I'm  Ive I've  isnt isn't  itd it'd  itd've it'd've
    it'dve it'd've  itll it'll  let's let's  maam ma'am  mightnt mightn't
    mightnt've mightn't've  mightn'tve mightn't've  mightve might've  mustnt mustn't
    mustve must've  neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't
    ow's'at 'ow's'at  'ows'at 'ow's'at  'ow'sat 'ow's'at  shant shan't  shed've she'd've
    she'dve she'd've  she's she's  shouldve should've  shouldnt shouldn't
    shouldnt've shouldn't've  shouldn'tve shouldn't've  somebody'd somebodyd
    somebodyd've somebody'd've  somebody'dve somebody'd've  somebodyll somebody'll
    somebodys somebody's  someoned someone'd  someoned've someone'd've
    someone'dve someone'd've  someonell someone'll  someones someone's
    somethingd something'd  somethingd've something'd've  something'dve something'd've
    somethingll something'll  thats that's  thered there'd  thered've there'd've
    there'dve there'd've  therere there're  theres there's  theyd they'd
    theyd've they'd've  they'dve they'd've  theyll they'll  theyre they're  theyve they've
    twas 'twas  wasnt wasn't  wed've we'd've  we'dve we'd've  weve we've  werent weren't
    whatll what'll  whatre what're  whats what's  whatve what've  whens when's
    whered where'd  wheres where's  whereve where've  whod who'd  whod've who'd've
    who'dve who'd've  wholl who'll  whos who's  whove who've  whyll why'll  whyre why're
    whys why's  wont won't  wouldve would've  wouldnt wouldn't  wouldnt've wouldn't've
    wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
    yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd
    youd've you'd've  you'dve you'd've  youll you'll  youre you're  youve you've
""")

_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
#: The official pattern: its "(?!<=\d)" is a look-ahead that always holds before a period, so
#: this deletes a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_DELETED = 32


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring)."""
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or delete_all else " ")
    return _PERIOD.sub("", out, count=_PERIODS_DELETED)


def process_words(text: str) -> str:
    """The official word step: lowercase, number words to digits, articles dropped,
    contractions fixed; words joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A prediction as the official script normalises it before comparing."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_words(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The accuracy in [0, 1] of `prediction` against the human `answers` of one question:
    the consensus rule with CONSENSUS or more answers, exact match with fewer."""
    if not answers:
        raise ValueError("a question needs at least one reference answer to be scored")
    predicted = normalize_answer(prediction)
    if len(answers) < CONSENSUS:
        return float(any(normalize_answer(answer) == predicted for answer in answers))
    humans = list(answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(answer) for answer in humans]
    matches = [human == predicted for human in humans]
    total = sum(matches)
    credits = [min(1.0, (total - own) / AGREEING) for own in matches]
    return sum(credits) / len(credits)
