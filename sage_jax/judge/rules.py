"""``rules:`` (``rules:v1``) — a deterministic heuristic judge: the offline default, and honest about it.

It is *not* a language model. It reads the prompts of :mod:`sage_jax.judge.prompts` (and only
those: any other prompt is a recorded failure) and answers in the format each asks for, so every
stage runs offline end to end. Every result carries the judge's name ``rules:v1``
(``Selection.judge``, ``meta["annotator"]``), so rule-made labels are never mistaken for a real
judge's. It ignores temperature and seed: the same prompt always gets the same answer.

**Best of K** (``Response X is better`` / ``No good one``): each candidate gets the score
:func:`score_reply` against the user's last message; the highest wins, ties go to the lower
number; if even the best scores below :data:`NO_GOOD_BELOW` the answer is ``No good one``. A
well-formed latent prefix shown to the selector is not scored (a malformed one is, as leakage). A
candidate that is a whole continuation (lookahead, beams) scores the mean of its assistant turns,
each against the user turn before it.
:func:`score_reply` adds up (weights in :data:`WEIGHTS`):

* ``question``: +1 if the reply ends its turn with a question (keeps the dialogue going);
* ``interrogation``: -0.5 per question mark beyond two (keeps it going *without* interrogating);
* ``length``: +1 for 8 to 60 words; below, up to -0.5; above, -1 per 40 extra words (max -2);
* ``repetition``: -2 x the fraction of word trigrams that repeat an earlier one;
* ``overlap``: +2 x the fraction of the user's content words the reply takes up (relevance);
* ``leakage``: -3 if latent variables leak into the text (``u_emotion:``, ``<|u_state|>`` ...);
* ``human_claim``: -1 if it claims to be human (a companion knows it is an AI);
* ``humour`` (humour mode only): +0.5 per humour marker (haha, lol, joke, emoji ...), max +1.
An empty reply scores -10.

**Pairwise** (``Dialog X is better``): each dialogue scores the mean :func:`score_reply` of its
assistant turns (each against the user turn before it), -1 per 40 words by which the assistant's
average turn exceeds 40 words (not verbose), +0.5 if the assistant uses contractions (colloquial).
Ties go to A (so a tie gives no consensus when both orders are judged).

**Annotation** (JSON): keyword rules per utterance: the emotion is the first label of
:data:`EMOTION_KEYWORDS` with a keyword in the text (else null; an assistant that sympathizes is
``caring``); the user's motivation is greeting / thanking / requesting / asking / venting /
sharing, the assistant's sympathizing / encouraging / suggesting / questioning / informing (first
rule that matches, see :func:`_user_motivation`, :func:`_assistant_motivation`); topics are the
(up to two) most frequent content words of four letters or more. Labels outside a closed label
set named in the prompt become null (topics outside it are dropped).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from sage_jax.judge.base import Completion
from sage_jax.judge.prompts import AnnotationPrompt, BestOfKPrompt, PairwisePrompt, parse_prompt
from sage_jax.sac import DEFAULT_SCHEMA, strip_latents

__all__ = ["RulesJudge", "score_reply", "ReplyScore", "WEIGHTS", "NO_GOOD_BELOW", "EMOTION_KEYWORDS",
           "annotate_turns"]

VERSIONS = ("v1",)
NO_GOOD_BELOW = -1.0
WEIGHTS = {"question": 1.0, "interrogation": -0.5, "length": 1.0, "repetition": -2.0, "overlap": 2.0,
           "leakage": -3.0, "human_claim": -1.0, "humour": 0.5}
LENGTH_BAND = (8, 60)

_STOP = frozenset("""a about above after again against all am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
each few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers herself
him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't my
myself no nor not of off on once only or other ought our ours ourselves out over own same shan't she she'd she'll
she's should shouldn't so some such than that that's the their theirs them themselves then there there's these they
they'd they'll they're they've this those through to too under until up very was wasn't we we'd we'll we're we've
were weren't what what's when when's where where's which while who who's whom why why's with won't would wouldn't
you you'd you'll you're you've your yours yourself yourselves just really also get got yes yeah okay ok well like
know think want going thing things something anything much many lot one two still even maybe really actually
today tomorrow yesterday now then time day sure right good bad keep keeps kept make makes made said says
tell told give gave take took come came goes went done need needs wants""".split())

_WORD = re.compile(r"[a-z][a-z']*")
_LEAK = re.compile(r"<\|/?(?:u_state|a_action)\|>|\b[ua]_(?:motivation|emotion|topic)\s*:|"
                   r"\b(?:user|assistant)_(?:motivation|emotion|topic)\s*:")
_HUMAN_CLAIM = re.compile(r"\bi(?:'m| am) (?:a |an )?(?:real |actual )?(?:human|person)\b")
_HUMOUR = re.compile(r"\b(?:haha\w*|hehe\w*|lol|lmao|joke|joking|pun|funny|kidding)\b|[😄😂🤣😉😅😆😜]")
_CONTRACTION = re.compile(r"\b\w+'(?:m|s|re|ll|ve|d|t)\b")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def _content(text: str, min_len: int = 3) -> list[str]:
    return [w for w in _words(text) if len(w) >= min_len and w not in _STOP]


@dataclass(frozen=True)
class ReplyScore:
    total: float
    parts: dict[str, float]


def score_reply(reply: str, last_user: str = "", *, humour: bool = False) -> ReplyScore:
    """The documented heuristic score of one reply (see the module docstring)."""
    words = reply.split()
    if not words:
        return ReplyScore(-10.0, {"empty": -10.0})
    parts: dict[str, float] = {}
    stripped = reply.rstrip()
    last_sentence = re.split(r"(?<=[.!?])\s+", stripped)[-1]
    parts["question"] = WEIGHTS["question"] if last_sentence.rstrip(" )\"'😊🙂").endswith("?") else 0.0
    parts["interrogation"] = WEIGHTS["interrogation"] * max(0, reply.count("?") - 2)
    n, (lo, hi) = len(words), LENGTH_BAND
    if n < lo:
        parts["length"] = -0.5 * (lo - n) / lo
    elif n > hi:
        parts["length"] = -min(2.0, (n - hi) / 40.0)
    else:
        parts["length"] = WEIGHTS["length"]
    w = _words(reply)
    grams = [tuple(w[i:i + 3]) for i in range(len(w) - 2)]
    repeated = len(grams) - len(set(grams))
    parts["repetition"] = WEIGHTS["repetition"] * (repeated / len(grams) if grams else 0.0)
    user_words = set(_content(last_user))
    parts["overlap"] = WEIGHTS["overlap"] * (len(user_words & set(_content(reply))) / len(user_words)
                                             if user_words else 0.0)
    parts["leakage"] = WEIGHTS["leakage"] if _LEAK.search(reply) else 0.0
    parts["human_claim"] = WEIGHTS["human_claim"] if _HUMAN_CLAIM.search(reply.lower()) else 0.0
    if humour:
        parts["humour"] = min(1.0, WEIGHTS["humour"] * len(_HUMOUR.findall(reply.lower())))
    return ReplyScore(round(sum(parts.values()), 6), parts)


def _last_user(turns) -> str:
    return next((text for role, text in reversed(turns) if role == "user"), "")


def _reply(text: str) -> str:
    """What the user would read: a well-formed latent prefix (a selector prompt may show it) is
    not part of the reply; a malformed one stays and scores as leakage."""
    return strip_latents(text, DEFAULT_SCHEMA)


def _continuation_score(turns, user: str, humour: bool) -> float:
    """Mean score of a continuation's assistant turns, each against the user turn before it."""
    scores = []
    for role, text in turns:
        if role == "user":
            user = text
        else:
            scores.append(score_reply(_reply(text), user, humour=humour).total)
    return sum(scores) / len(scores)


def _best_of_k(p: BestOfKPrompt) -> str:
    user = _last_user(p.turns)
    if p.continuations is not None:
        scores = [_continuation_score(c, user, p.humour) for c in p.continuations]
    else:
        scores = [score_reply(_reply(c), user, humour=p.humour).total for c in p.candidates]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    if scores[best] < NO_GOOD_BELOW:
        return "No good one"
    return f"Response {best + 1} is better"


def _dialog_score(turns) -> float:
    scores, lengths, prev_user, colloquial = [], [], "", False
    for role, text in turns:
        if role == "user":
            prev_user = text
            continue
        scores.append(score_reply(text, prev_user).total)
        lengths.append(len(text.split()))
        colloquial = colloquial or bool(_CONTRACTION.search(text.lower().replace("’", "'")))
    if not scores:
        return -10.0
    avg_len = sum(lengths) / len(lengths)
    return sum(scores) / len(scores) - max(0.0, (avg_len - 40) / 40) + (0.5 if colloquial else 0.0)


def _pairwise(p: PairwisePrompt) -> str:
    return "Dialog B is better" if _dialog_score(p.dialog_b) > _dialog_score(p.dialog_a) else "Dialog A is better"


# ---------------------------------------------------------------- annotation
EMOTION_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("grateful", ("thanks", "thank", "grateful", "appreciate")),
    ("sad", ("sad", "unhappy", "depressed", "cry", "crying", "miserable", "heartbroken", "upset")),
    ("angry", ("angry", "furious", "mad", "hate")),
    ("annoyed", ("annoyed", "irritated", "irritating", "annoying")),
    ("afraid", ("afraid", "scared", "terrified", "fear", "frightened")),
    ("anxious", ("anxious", "worried", "nervous", "stress", "stressed", "worry")),
    ("lonely", ("lonely", "alone", "isolated")),
    ("disappointed", ("disappointed", "failed", "fail", "unfortunately", "bummed")),
    ("excited", ("excited", "thrilled", "can't wait", "awesome", "amazing")),
    ("joyful", ("happy", "glad", "great", "wonderful", "love", "fun", "enjoy")),
    ("surprised", ("wow", "surprised", "unexpected", "whoa")),
    ("curious", ("curious", "wonder", "wondering")),
)
_SYMPATHY = ("sorry", "that sounds", "must be", "i understand", "that's tough", "that's rough", "hang in there")
_ENCOURAGE = ("you can do", "good luck", "well done", "congratulations", "congrats", "proud of you",
              "you've got this", "great job")
_SUGGEST = ("you could", "you should", "try", "maybe", "how about", "i suggest", "i recommend", "consider")
_REQUEST_START = ("write", "explain", "give", "tell", "list", "create", "make", "show", "help", "describe",
                  "summarize", "summarise", "translate", "generate", "find", "please")
_REQUEST = ("how do i", "how can i", "can you", "could you", "would you", "help me", "i need")
_GREETING = ("hi", "hello", "hey", "greetings", "good morning", "good evening")
_NEGATIVE = frozenset({"sad", "angry", "annoyed", "afraid", "anxious", "lonely", "disappointed"})


def _has(text: str, phrase: str) -> bool:
    """``phrase`` occurs in ``text`` as whole words."""
    return re.search(r"(?<![a-z'])" + re.escape(phrase) + r"(?![a-z])", text) is not None


def _emotion(text: str) -> str | None:
    low = text.lower().replace("’", "'")
    for label, keys in EMOTION_KEYWORDS:
        if any(_has(low, k) for k in keys):
            return label
    return None


def _user_motivation(text: str, emotion: str | None) -> str:
    low = text.lower().replace("’", "'").strip()
    first = (_words(low) or [""])[0]
    if any(low.startswith(g) for g in _GREETING) and len(low.split()) <= 6:
        return "greeting"
    if emotion == "grateful":
        return "thanking"
    if first in _REQUEST_START or any(_has(low, r) for r in _REQUEST):
        return "requesting"
    if "?" in low:
        return "asking"
    if emotion in _NEGATIVE:
        return "venting"
    return "sharing"


def _assistant_motivation(text: str) -> str:
    low = text.lower().replace("’", "'")
    if any(_has(low, s) for s in _SYMPATHY):
        return "sympathizing"
    if any(_has(low, s) for s in _ENCOURAGE):
        return "encouraging"
    if any(_has(low, s) for s in _SUGGEST):
        return "suggesting"
    if low.rstrip().endswith("?"):
        return "questioning"
    return "informing"


def _topics(text: str, k: int = 2) -> list[str]:
    emotion_words = {w for _, keys in EMOTION_KEYWORDS for w in keys}
    words = [w.strip("'") for w in _content(text, 4) if w not in emotion_words]
    words = [w[:-2] if w.endswith("'s") else w for w in words if w]
    counts = Counter(words)
    first = {w: i for i, w in reversed(list(enumerate(words)))}
    return sorted(counts, key=lambda w: (-counts[w], first[w]))[:k]


def annotate_turns(turns, label_sets: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """Keyword-rule labels ``{"motivation", "emotion", "topic"}`` of each ``(role, text)`` turn."""
    sets = label_sets or {}
    out = []
    for role, text in turns:
        emotion = _emotion(text)
        if role == "user":
            motivation = _user_motivation(text, emotion)
        else:
            motivation = _assistant_motivation(text)
            if motivation == "sympathizing" and emotion in (None, *_NEGATIVE):
                emotion = "caring"
        lab = {"motivation": motivation, "emotion": emotion, "topic": _topics(text)}
        for name in ("motivation", "emotion"):
            allowed = sets.get(f"{role} {name}")
            if allowed is not None and lab[name] not in allowed:
                lab[name] = None
        allowed = sets.get(f"{role} topic")
        if allowed is not None:
            lab["topic"] = [t for t in lab["topic"] if t in allowed]
        out.append(lab)
    return out


_ENDS_WITH_QUESTION = re.compile(r"\?[\s\"'\u201d\u2019)\]]*\Z")


def bridging_question(labels: dict, user_labels: dict | None) -> str:
    """A short question that hands the turn back to the user: how they are holding up after a
    negative emotion, else more about the first topic (the user's, then the assistant's), else
    what they think."""
    user_labels = user_labels or {}
    if user_labels.get("emotion") in _NEGATIVE:
        return "How are you holding up?"
    topics = list(user_labels.get("topic") or []) + list(labels.get("topic") or [])
    if topics:
        return f"What else is on your mind about {topics[0]}?"
    return "What do you think?"


def with_bridging_question(text: str, labels: dict, user_labels: dict | None) -> str | None:
    """``text`` with :func:`bridging_question` appended, or None when it already ends with a question."""
    body = text.rstrip()
    if not body or _ENDS_WITH_QUESTION.search(body):
        return None
    if body[-1].isalnum():
        body += "."
    return f"{body} {bridging_question(labels, user_labels)}"


def _annotation(p: AnnotationPrompt) -> str:
    """Labels for every utterance; when the prompt allows rewrites (the reference annotator), an
    assistant utterance that does not end with a question gets a bridging question appended, as
    its ``text`` (labels describe the utterance as written)."""
    labels = annotate_turns(p.turns, p.label_sets)
    rows = []
    for i, ((role, text), lab) in enumerate(zip(p.turns, labels), 1):
        row = {"turn": i, "role": role, **lab}
        if p.allow_rewrite and role == "assistant":
            prev = labels[i - 2] if i >= 2 and p.turns[i - 2][0] == "user" else None
            new = with_bridging_question(text, lab, prev)
            if new is not None:
                row["text"] = new
        rows.append(row)
    return json.dumps({"annotations": rows}, ensure_ascii=False)


class RulesJudge:
    """The deterministic heuristic judge (see the module docstring). ``name`` is ``rules:VERSION``."""

    def __init__(self, version: str = "v1"):
        if version not in VERSIONS:
            raise ValueError(f"unknown rules judge version {version!r} (known: {', '.join(VERSIONS)})")
        self.version = version
        self.name = f"rules:{version}"

    def answer(self, prompt: str) -> str | None:
        """The answer to one of our prompts, or None if ``prompt`` is not one."""
        p = parse_prompt(prompt)
        if isinstance(p, BestOfKPrompt):
            return _best_of_k(p)
        if isinstance(p, PairwisePrompt):
            return _pairwise(p)
        if isinstance(p, AnnotationPrompt):
            return _annotation(p)
        return None

    def complete(self, prompts: list[str], *, temperature: float = 0.8, max_tokens: int = 64,
                 seed: int | None = None) -> list[Completion]:
        out = []
        for prompt in prompts:
            text = self.answer(prompt) if isinstance(prompt, str) else None
            out.append(Completion(text) if text is not None else Completion(
                None, error=f"{self.name} cannot read this prompt (not one of sage_jax.judge.prompts)"))
        return out

    def __repr__(self) -> str:
        return f"RulesJudge({self.name!r})"
