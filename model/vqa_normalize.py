"""VQA answer normalisation: the official vqaEval.py tables and functions, and bottom-up-attention-vqa's
``preprocess_answer`` (the normalisation of the answer vocabulary and the training targets).

Source reproduced (behaviour, quirks included; the code is our own): GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at master (commit a013f00), ``processPunctuation`` and
``processDigitArticle`` with their contraction, number-word, article and punctuation tables; when the official
evaluation applies them is ``model.vqa.question_accuracy``'s business.

`process_punctuation` quirks kept: a mark is deleted (not replaced by a space) when the *original* text
has it next to a space or has a digit,digit comma anywhere; the period pattern ``(?!<=\\d)(\\.)(?!\\d)``
(a mistyped look-behind) removes periods not followed by a digit, at most 32 of them (``re.UNICODE``
passed as the ``count`` argument of ``re.sub``). Earlier versions of that file differ (07aecec normalised
the prediction always and GT answers with punctuation only); we follow master.
"""

from __future__ import annotations

import re

_CONTRACTIONS_TEXT = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at
'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's
whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've
who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's|wont won't
wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll
y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
# The official table (vqaEval.py), written as "from to" pairs.
CONTRACTIONS: dict[str, str] = dict(
    entry.strip().split(" ") for entry in _CONTRACTIONS_TEXT.replace("\n", "|").split("|") if entry.strip()
)
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official code passes re.UNICODE (32) as re.sub's count


# ------------------------------------------------------------------------------------------ normalisation
def process_punctuation(text: str) -> str:
    """Official ``processPunctuation`` (vqaEval.py), quirks included (see the module docstring)."""
    out = text
    delete = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete or (mark + " " in text) or (" " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words -> digits, drop a/an/the, add apostrophes."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """Official full normalisation: `process_punctuation` then `process_digit_article` (applied by the official
    evaluation only to questions whose GT answers disagree, see `question_accuracy`)."""
    return process_digit_article(process_punctuation(answer))


def strip_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def preprocess_answer(answer: str) -> str:
    """bottom-up-attention-vqa ``preprocess_answer``: normalisation for the vocabulary and training targets."""
    return normalize_answer(answer).replace(",", "")
