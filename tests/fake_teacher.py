"""Fake teacher: a local OpenAI-compatible chat server with knobs, for tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from distillery.tasks.teacher import ChatRequest

# --------------------------------------------------------------------------------------------
# Knobs and counters
# --------------------------------------------------------------------------------------------


@dataclass
class Knobs:
    """How the server behaves; mutable at runtime, read on every request."""

    latency: float = 0.0  # seconds slept per answered request, inside a slot
    slots: int = 64  # requests processed at once; the rest queue
    rpm: int | None = None  # requests per minute, sliding 60 s window; over it -> 429
    tpm: int | None = None  # tokens per minute (prompt chars // 4 + max_tokens); over it -> 429
    # Length of the sliding window that enforces rpm and tpm, pro rata: 60 s allows rpm requests
    # in any minute; 1 s allows rpm / 60 in any second (providers enforce per-minute limits in
    # such finer quanta, so a burst at the start of a minute is refused).
    rate_window: float = 60.0
    fault_rate: float = 0.0  # probability of a fault instead of an answer
    # drop = close the connection, no response; "429" = a rate-limit answer with Retry-After 0.2 s
    faults: tuple[str, ...] = ("500", "503", "drop")
    reply: str = "normal"  # "normal" | "prose" | "malformed_json"
    status: int | None = None  # every request answers this status with an OpenAI error body
    reject_json_schema: bool = False  # response_format json_schema -> an error (llama.cpp-like)
    reject_json_schema_status: int = 400  # 400, or 500 as llama-cpp-python 0.3.36's server does
    truncate_rate: float = 0.0  # share of answer replies cut with finish_reason "length"
    refusal_rate: float = 0.0  # share of answer replies that are a refusal
    seed: int = 0  # faults, truncation and refusals derive from seed + body hash (+ attempt)
    # Expansion replies in JSON: this share of them has, as its first example, one of `planted`
    # (user_context, question) pairs (a teacher that saw them in training echoes them).
    planted: tuple[tuple[str, str], ...] = ()
    plant_rate: float = 0.0
    # Judge mode (requests whose system prompt carries JUDGE_MARKER, as tasks/judge.py builds
    # them): every criterion gets judge_score; an answer containing judge_low_marker gets
    # judge_low_score; one containing judge_garbage_marker gets a reply that is no verdict.
    judge_score: int = 8
    judge_low_marker: str | None = None
    judge_low_score: int = 2
    judge_garbage_marker: str | None = None
    # Pairwise verdicts: "longer" (the longer answer wins, in either order), "first" (answer A
    # always wins: a judge whose verdicts flip with the order), "longer_if_first" (the longer
    # answer wins when shown first, else a tie), "tie".
    judge_pairwise: str = "longer"


@dataclass
class Stats:
    """Counters of what the server saw and sent (a snapshot when read through FakeTeacher.stats)."""

    received: int = 0  # requests to chat completions, faulted and rate-limited ones included
    answered: int = 0  # 200 responses sent
    faults: collections.Counter[str] = field(default_factory=collections.Counter)  # by kind
    rate_limited: int = 0  # 429s from the rpm/tpm limits
    rejected: int = 0  # 4xx/5xx from the status knob, reject_json_schema or a bad body
    max_in_flight: int = 0  # most requests holding a slot at once
    max_queued: int = 0  # most requests waiting for a slot at once
    answered_by_body: collections.Counter[str] = field(default_factory=collections.Counter)
    received_by_body: collections.Counter[str] = field(default_factory=collections.Counter)
    resent_after_answer: int = 0  # requests whose body had already been answered on arrival
    # Requests by the response_format type they asked for ("text": none asked).
    received_by_form: collections.Counter[str] = field(default_factory=collections.Counter)
    # Judge requests answered, by kind: "score" | "pairwise".
    judged: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def answered_twice(self) -> int:
        """Bodies answered more than once (a client that lost or ignored an answer)."""
        return sum(1 for n in self.answered_by_body.values() if n > 1)

    def copy(self) -> Stats:
        return Stats(
            received=self.received,
            answered=self.answered,
            faults=collections.Counter(self.faults),
            rate_limited=self.rate_limited,
            rejected=self.rejected,
            max_in_flight=self.max_in_flight,
            max_queued=self.max_queued,
            answered_by_body=collections.Counter(self.answered_by_body),
            received_by_body=collections.Counter(self.received_by_body),
            resent_after_answer=self.resent_after_answer,
            received_by_form=collections.Counter(self.received_by_form),
            judged=collections.Counter(self.judged),
        )

    def summary(self) -> dict[str, Any]:
        """Plain counters (no per-body maps), as the standalone server prints them on exit."""
        return {
            "received": self.received,
            "answered": self.answered,
            "faults": dict(self.faults),
            "rate_limited": self.rate_limited,
            "rejected": self.rejected,
            "max_in_flight": self.max_in_flight,
            "max_queued": self.max_queued,
            "distinct_bodies": len(self.received_by_body),
            "answered_twice": self.answered_twice,
            "resent_after_answer": self.resent_after_answer,
            "judged": dict(self.judged),
        }


# --------------------------------------------------------------------------------------------
# Vocabulary (precomputed once) and text generators; no generated text contains '#'
# --------------------------------------------------------------------------------------------

_JOBS = (
    "nurse",
    "software engineer",
    "high school teacher",
    "electrician",
    "dentist",
    "truck driver",
    "accountant",
    "graphic designer",
    "pharmacist",
    "firefighter",
    "barista",
    "civil engineer",
    "marketing manager",
    "plumber",
    "physical therapist",
    "data analyst",
    "police officer",
    "freelance photographer",
    "restaurant owner",
    "lawyer",
    "veterinarian",
    "warehouse supervisor",
    "university lecturer",
    "real estate agent",
    "airline pilot",
    "social worker",
    "carpenter",
    "product manager",
    "retail store manager",
    "medical resident",
    "sales representative",
    "stay-at-home parent",
    "mechanic",
    "architect",
    "PhD student",
    "small business owner",
    "government clerk",
    "research chemist",
    "yoga instructor",
    "uber driver",
    "HR specialist",
    "video game developer",
    "farmer",
    "librarian",
    "paramedic",
    "consultant",
    "chef",
    "insurance adjuster",
    "translator",
    "logistics coordinator",
    "retired army officer",
)
_PLACES = (
    "Ohio",
    "Texas",
    "a small town in Maine",
    "Chicago",
    "Denver",
    "rural Georgia",
    "Seattle",
    "Phoenix",
    "Toronto",
    "Manchester",
    "Berlin",
    "Dublin",
    "Austin",
    "Florida",
    "Minneapolis",
    "the Bay Area",
    "Brooklyn",
    "Sydney",
    "Singapore",
    "Lisbon",
    "Nashville",
    "Utah",
    "Vermont",
    "Amsterdam",
    "Munich",
    "Zurich",
    "New Jersey",
    "Arizona",
    "San Diego",
    "Portland",
)
_FAMILY = (
    "I'm single with no kids",
    "I'm married and we have two young children",
    "my wife and I are expecting our first baby",
    "I'm a single mom of a teenager",
    "I'm divorced and pay child support",
    "my husband is self-employed with irregular income",
    "we support my elderly parents",
    "I live with my partner and we split expenses",
    "I have three kids heading to college soon",
    "I'm newly married",
    "my kids are grown and out of the house",
    "I'm widowed",
    "I share custody of a 7-year-old",
    "my partner earns about twice what I do",
    "we just adopted a toddler",
)
_ASSETS = (
    "an S&P 500 index fund",
    "VTI",
    "VOO",
    "QQQ",
    "SCHD",
    "individual tech stocks",
    "Tesla shares",
    "Apple stock",
    "a target-date 2050 fund",
    "treasury bills",
    "a bond ladder",
    "Bitcoin",
    "Ethereum",
    "gold ETFs",
    "REITs",
    "Nvidia shares",
    "Microsoft stock",
    "a total world fund",
    "emerging market ETFs",
    "municipal bonds",
    "dividend aristocrats",
    "Amazon stock",
    "CDs at my credit union",
    "company stock from my employer",
    "a small-cap value fund",
    "I bonds",
    "Berkshire Hathaway B shares",
    "Coca-Cola stock",
    "a robo-advisor portfolio",
    "international developed-market ETFs",
    "a money market fund",
    "covered call ETFs like JEPI",
)
_ACCOUNTS = (
    "401(k)",
    "Roth IRA",
    "traditional IRA",
    "taxable brokerage account",
    "HSA",
    "SEP IRA",
    "403(b)",
    "529 plan",
    "ISA",
    "TFSA",
    "RRSP",
    "solo 401(k)",
    "pension",
    "457(b)",
)
_GOALS = (
    "buy a house in about {n} years",
    "retire early around {age2}",
    "pay for my kids' college",
    "build a down payment fund",
    "retire comfortably at {age2}",
    "start my own business in {n} years",
    "generate enough dividend income to cover my rent",
    "leave something for my grandchildren",
    "take a year off to travel in {n} years",
    "reach financial independence by {age2}",
    "buy a rental property",
    "pay off my mortgage before I retire",
    "fund a sabbatical",
    "grow a safety net big enough to switch careers",
    "help my parents with their medical bills",
    "double my portfolio within {n} years",
    "cover a wedding in {n} years",
)
_RISK = (
    "I can handle big swings and don't panic sell",
    "I get very nervous when the market drops",
    "I sold everything in 2020 and regret it",
    "I consider myself moderately risk tolerant",
    "losing more than 10% would keep me up at night",
    "I like aggressive growth bets",
    "I prefer steady, boring investments",
    "I've never invested before and I'm cautious",
    "I'm comfortable with risk as long as it's diversified",
    "I tend to chase hot stocks",
    "I want capital preservation above everything",
    "volatility doesn't bother me much",
    "I check my portfolio every day and it stresses me out",
    "I lost money on meme stocks once",
)
_DEBTS = (
    "I still owe ${amt} in student loans at {rate}%",
    "I have a ${amt} car loan at {rate}%",
    "my mortgage balance is ${amt} at {rate}%",
    "I carry ${amt} of credit card debt at {rate}%",
    "I have no debt at all",
    "I just paid off my last loan",
    "I owe ${amt} on a HELOC at {rate}%",
    "there's a ${amt} personal loan at {rate}% I'm paying down",
)
_EXTRAS = (
    "My employer matches {pct}% of my 401(k) contributions.",
    "I expect a ${amt} bonus this year.",
    "I'm about to inherit roughly ${amt}.",
    "I just got a raise of about {pct}%.",
    "My emergency fund covers about {n} months of expenses.",
    "I might be laid off next year.",
    "I receive RSUs worth about ${amt} a year.",
    "I'm in the {pct}% tax bracket.",
    "I sold a property and have ${amt} in proceeds.",
    "I have a pension that will pay ${amt} a year.",
    "My spouse has a separate ${amt} retirement account.",
    "I plan to go back to school.",
    "I want to avoid companies involved in fossil fuels.",
    "I work in tech so my job is cyclical.",
    "I have a health condition that may force early retirement.",
)
_TICKERS = (
    "AAPL",
    "MSFT",
    "NVDA",
    "TSLA",
    "AMZN",
    "GOOGL",
    "META",
    "JNJ",
    "KO",
    "PG",
    "JPM",
    "XOM",
    "VZ",
    "T",
    "PFE",
    "DIS",
    "NFLX",
    "AMD",
    "INTC",
    "O",
    "COST",
    "WMT",
    "BRK.B",
    "SCHD",
    "VTI",
    "VOO",
    "QQQ",
    "BND",
    "VXUS",
    "JEPI",
    "ARKK",
    "SPY",
    "MO",
    "ABBV",
    "HD",
    "MCD",
    "PLTR",
    "SOFI",
)
_Q_TOPICS = (
    "rebalancing",
    "dollar-cost averaging",
    "a Roth conversion",
    "tax-loss harvesting",
    "my emergency fund",
    "bond funds",
    "dividend stocks",
    "international diversification",
    "target-date funds",
    "paying down debt first",
    "my asset allocation",
    "index funds",
    "sector ETFs",
    "REITs",
    "I bonds",
    "high-yield savings",
    "covered calls",
    "the 4% rule",
    "a backdoor Roth",
    "my company stock",
    "small-cap value",
    "gold as a hedge",
    "crypto exposure",
)

_CTX_INTROS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: (
        f"I'm {r.randint(22, 70)} years old and work as a {r.choice(_JOBS)} in {r.choice(_PLACES)}."
    ),
    lambda r: (
        f"{r.randint(22, 70)}-year-old {r.choice(_JOBS)} here, living in {r.choice(_PLACES)}."
    ),
    lambda r: f"I am a {r.choice(_JOBS)}, age {r.randint(22, 70)}.",
    lambda r: (
        f"I'm {r.randint(22, 70)} and I've been a {r.choice(_JOBS)} for {r.randint(1, 30)} years."
    ),
    lambda r: f"Age {r.randint(22, 70)}, {r.choice(_JOBS)}, based in {r.choice(_PLACES)}.",
    lambda r: f"I work as a {r.choice(_JOBS)} and just turned {r.randint(22, 70)}.",
    lambda r: f"Currently {r.randint(22, 70)}, working part time as a {r.choice(_JOBS)}.",
)


def _amount(r: random.Random, low: int, high: int) -> str:
    value = r.randint(low, high)
    step = 1000 if value >= 20000 else 100 if value >= 2000 else 10
    return f"{round(value / step) * step:,}"


def _rate(r: random.Random) -> str:
    return f"{r.randint(2, 24)}.{r.randint(0, 9)}"


def _fill(r: random.Random, template: str) -> str:
    if "{" not in template:
        return template
    if "{amt}" in template:
        template = template.replace("{amt}", _amount(r, 800, 400000))
    if "{rate}" in template:
        template = template.replace("{rate}", _rate(r))
    if "{pct}" in template:
        template = template.replace("{pct}", str(r.randint(2, 40)))
    if "{n}" in template:
        template = template.replace("{n}", str(r.randint(2, 15)))
    if "{age2}" in template:
        template = template.replace("{age2}", str(r.randint(45, 67)))
    return template


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_CTX_FACETS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: _cap(r.choice(_FAMILY)) + ".",
    lambda r: f"I earn about ${_amount(r, 25000, 350000)} a year before taxes.",
    lambda r: f"My take-home pay is around ${_amount(r, 1800, 15000)} a month.",
    lambda r: f"I have ${_amount(r, 500, 250000)} sitting in a savings account.",
    lambda r: f"About ${_amount(r, 1000, 900000)} of my money is in {r.choice(_ASSETS)}.",
    lambda r: (
        f"My {r.choice(_ACCOUNTS)} holds roughly ${_amount(r, 1000, 1500000)}, "
        f"mostly in {r.choice(_ASSETS)}."
    ),
    lambda r: (
        f"I own {r.randint(3, 900)} shares of {r.choice(_TICKERS)} bought at ${r.randint(5, 600)}."
    ),
    lambda r: (
        f"My portfolio is {r.randint(10, 95)}% {r.choice(_ASSETS)} and the rest in "
        f"{r.choice(_ASSETS)}."
    ),
    lambda r: f"I want to {_fill(r, r.choice(_GOALS))}.",
    lambda r: f"My main goal is to {_fill(r, r.choice(_GOALS))}.",
    lambda r: _cap(r.choice(_RISK)) + ".",
    lambda r: f"My time horizon is roughly {r.randint(2, 40)} years.",
    lambda r: _cap(_fill(r, r.choice(_DEBTS))) + ".",
    lambda r: f"I can invest about ${_amount(r, 50, 8000)} every month.",
    lambda r: _fill(r, r.choice(_EXTRAS)),
    lambda r: f"I contribute {r.randint(1, 25)}% of my salary to my {r.choice(_ACCOUNTS)}.",
)

_QUESTIONS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: (
        f"Should I sell my {r.choice(_TICKERS)} shares and move the money into {r.choice(_ASSETS)}?"
    ),
    lambda r: f"Is it smart to put ${_amount(r, 1000, 200000)} into {r.choice(_ASSETS)} right now?",
    lambda r: f"How should I think about {r.choice(_Q_TOPICS)} in my {r.choice(_ACCOUNTS)}?",
    lambda r: f"Does {r.choice(_Q_TOPICS)} make sense for someone in my situation?",
    lambda r: (
        f"What's a reasonable split between stocks and bonds for me over {r.randint(2, 35)} years?"
    ),
    lambda r: f"Would you prioritize my {r.choice(_ACCOUNTS)} or {r.choice(_Q_TOPICS)} first?",
    lambda r: f"Is {r.choice(_TICKERS)} a good long-term holding for dividend income?",
    lambda r: f"How much of my portfolio should be in {r.choice(_ASSETS)}?",
    lambda r: f"Should I pay off debt or invest the extra ${_amount(r, 100, 5000)} a month?",
    lambda r: (
        f"When should I rebalance if {r.choice(_ASSETS)} is now {r.randint(30, 90)}% of "
        "my holdings?"
    ),
    lambda r: f"Is a {r.choice(_ACCOUNTS)} better than a {r.choice(_ACCOUNTS)} for my goals?",
    lambda r: (
        f"What are the tax consequences of selling {r.choice(_TICKERS)} after "
        f"{r.randint(2, 30)} months?"
    ),
    lambda r: (
        f"Should I worry about {r.choice(_TICKERS)} being {r.randint(5, 60)}% below its high?"
    ),
    lambda r: f"Can I afford to {_fill(r, r.choice(_GOALS))} with what I have?",
    lambda r: f"Are {r.choice(_ASSETS)} too risky for me given a {r.randint(1, 30)}-year horizon?",
    lambda r: f"How would you invest a ${_amount(r, 2000, 500000)} windfall?",
    lambda r: f"Is it worth switching from {r.choice(_ASSETS)} to {r.choice(_ASSETS)}?",
)


# Precomputed facet orders: cheaper per request than shuffling the facets each time.
_FACET_ORDERS = tuple(
    tuple(random.Random(i).sample(range(len(_CTX_FACETS)), len(_CTX_FACETS))) for i in range(1024)
)


def gen_user_context(r: random.Random) -> str:
    """A retail investor's situation, 60-400 characters."""
    target = r.randint(140, 380)
    parts = [r.choice(_CTX_INTROS)(r)]
    length = len(parts[0])
    for index in r.choice(_FACET_ORDERS):
        sentence = _CTX_FACETS[index](r)
        if length + 1 + len(sentence) > 400:
            continue
        parts.append(sentence)
        length += 1 + len(sentence)
        if length >= target:
            break
    return " ".join(parts)


def chat_requests(n: int, tag: str = "q", max_tokens: int = 64) -> list[ChatRequest]:
    """`n` distinct engine requests in the answer stage's shape; this server echoes the question.

    (The project's ChatRequest is imported here, not at the top: the server runs on its own.)
    """
    from distillery.tasks.teacher import ChatRequest

    return [
        ChatRequest(
            messages=(("user", f"# USER CONTEXT\nInvestor {tag}{i}.\n\n# QUESTION\nBuy {i}?"),),
            temperature=0.7,
            top_p=1.0,
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]


def gen_question(r: random.Random) -> str:
    """A retail investing question, 20-200 characters, ending in '?'."""
    question = r.choice(_QUESTIONS)(r)
    if len(question) > 200:  # pragma: no cover - templates stay far below
        question = question[:199].rstrip() + "?"
    return question


_OPENINGS = (
    "Regarding your question ({q}), the short answer is that it depends on your horizon and "
    "how much volatility you can live with.",
    "You asked: {q} Let me walk through how I would approach it.",
    'Good question. On "{q}", my view is that you should start from your goals, not from '
    "the headlines.",
    'Thanks for the detail. About "{q}", here is how I would think it through.',
)
_BODY = (
    "First, keep an emergency fund of three to six months of expenses in cash before taking "
    "more market risk.",
    "Broad, low-cost index funds should form the core of most long-term portfolios.",
    "High-interest debt is a guaranteed negative return, so paying it down usually comes first.",
    "Use tax-advantaged accounts before a taxable account, and take any employer match in full.",
    "A single stock should rarely be more than five to ten percent of what you own.",
    "Rebalancing once or twice a year keeps your risk where you chose it to be.",
    "Bonds and cash lower the swings, which matters most when you need the money soon.",
    "Dollar-cost averaging smooths the entry point if investing a lump sum feels uncomfortable.",
    "Dividends are nice, but total return after taxes is what actually builds wealth.",
    "Check the expense ratio: a difference of half a percent compounds into a lot over decades.",
    "Selling a winning position in a taxable account can trigger capital gains tax, so plan it.",
    "Your time horizon is long enough that short-term drops should not drive your decisions.",
    "Write down an allocation you can stick with in a bad year, then automate contributions.",
)
_CLOSINGS = (
    "In short, stay diversified, keep costs low and revisit the plan when your situation changes.",
    "If you want more certainty, a fee-only fiduciary advisor can review the full picture.",
    "Whatever you choose, decide the rules in advance so emotions do not make the call.",
    "This is general information, so weigh it against your own taxes and circumstances.",
)
_PROSE = (
    "Investing well is mostly about patience, diversification and keeping costs low.",
    "Markets go up and down, and nobody can reliably predict the next move.",
    "A written plan helps you stay calm when prices fall.",
    "Your savings rate matters more than picking the perfect fund.",
    "Taxes and fees quietly eat returns if you ignore them.",
    "Time in the market usually beats trying to time the market.",
    "Every investor should know why they own each position.",
    "Simple portfolios are easier to hold through a crisis.",
)
REFUSAL = "I'm sorry, but I can't help with that request."
_QUESTION_MARKER = re.compile(r"(?im)^\s*#+\s*question\b[^\n]*\n")


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _question_of(user_text: str) -> str:
    """The question an answer request asks: after a QUESTION marker, else its last line."""
    found = list(_QUESTION_MARKER.finditer(user_text))
    text = user_text[found[-1].end() :] if found else user_text.strip().rsplit("\n", 1)[-1]
    text = " ".join(text.replace("#", " ").split())
    if len(text) > 120:
        text = text[:120].rsplit(" ", 1)[0] + "..."
    return text or "your situation"


def gen_answer(r: random.Random, question: str) -> str:
    """An advisor-style answer of 300-900 characters that echoes the question."""
    parts = [r.choice(_OPENINGS).format(q=question)]
    closing = r.choice(_CLOSINGS)
    target = r.randint(420, 800)
    length = len(parts[0]) + len(closing) + 1
    for sentence in r.sample(_BODY, len(_BODY)):
        if length + len(sentence) + 1 > min(target, 890):
            if length >= 300:
                break
            continue
        parts.append(sentence)
        length += len(sentence) + 1
    parts.append(closing)
    return " ".join(parts)[:900]


def gen_prose(r: random.Random) -> str:
    return " ".join(r.sample(_PROSE, r.randint(4, len(_PROSE))))


def _truncate(r: random.Random, text: str) -> str:
    cut = int(len(text) * r.uniform(0.35, 0.8))
    head = text[:cut].rsplit(" ", 1)[0]
    return head.rstrip(".,;:!? ")


def gen_examples_text(r: random.Random, n: int) -> str:
    return "\n\n".join(
        f"# USER CONTEXT {i}\n{gen_user_context(r)}\n\n# QUESTION {i}\n{gen_question(r)}"
        for i in range(1, n + 1)
    )


def gen_from_schema(
    schema: Any, r: random.Random, name: str = "", root: Any = None, depth: int = 0
) -> Any:
    """A value satisfying a (simple) JSON schema: object, array, string, number, boolean, enum."""
    if root is None:
        root = schema
    if not isinstance(schema, dict) or depth > 12:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for key in ref[2:].split("/"):
            target = target.get(key, {}) if isinstance(target, dict) else {}
        return gen_from_schema(target, r, name, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return r.choice(schema["enum"])
    for combo in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combo)
        if isinstance(options, list) and options:
            return gen_from_schema(options[0], r, name, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: gen_from_schema(v, r, k, root, depth + 1) for k, v in props.items()}
    if kind == "array":
        low: int | None = schema.get("minItems")
        high: int | None = schema.get("maxItems")
        if low is None:
            count = 3 if high is None else min(high, 3)
        else:
            count = max(low, 3) if high is None else r.randint(low, max(low, high))
        items = schema.get("items", {})
        return [gen_from_schema(items, r, name, root, depth + 1) for _ in range(count)]
    if kind == "string":
        if name == "user_context":
            return gen_user_context(r)
        if name == "question":
            return gen_question(r)
        return " ".join(r.choice(_Q_TOPICS).split()[:3])
    if kind == "integer":
        least = int(schema.get("minimum", 0))
        return r.randint(least, int(schema.get("maximum", least + 100)))
    if kind == "number":
        bottom = float(schema.get("minimum", 0.0))
        return round(r.uniform(bottom, float(schema.get("maximum", bottom + 100.0))), 2)
    if kind == "boolean":
        return r.random() < 0.5
    return None


# --------------------------------------------------------------------------------------------
# Judge mode: verdicts by rules the tests set (Knobs.judge_*)
# --------------------------------------------------------------------------------------------

# tasks/judge.py puts this in the system prompt of every judge request (a test checks they match).
JUDGE_MARKER = "distillery-judge"
GARBAGE_VERDICT = "Well, this answer has some good points and some weaker ones overall."
_CRITERIA = re.compile(r"(?m)^- ([a-z0-9_]+): ")


def _tagged(text: str, tag: str) -> str | None:
    found = re.search(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.DOTALL)
    return found.group(1) if found else None


def _system_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    return " ".join(
        _content_text(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") == "system"
    )


def judge_kind(body: dict[str, Any]) -> str | None:
    """The kind of a judge request ("score" or "pairwise"); None for any other request."""
    if JUDGE_MARKER not in _system_text(body.get("messages")):
        return None
    user = _last_user_text(body.get("messages"))
    return "pairwise" if "<answer_a>" in user and "<answer_b>" in user else "score"


def judge_reply(body: dict[str, Any], form: Any, knobs: Knobs) -> tuple[str, str] | None:
    """(content, finish_reason) of a judge request, or None for any other request.

    Structured forms (json_schema, json_object) get JSON; a request without response_format
    gets the verdict as `name: value` lines (the text form tasks/judge.py also reads).
    """
    kind = judge_kind(body)
    if kind is None:
        return None
    system = _system_text(body.get("messages"))
    user = _last_user_text(body.get("messages"))
    structured = form in ("json_schema", "json_object")
    pair = _tagged(user, "answer_a"), _tagged(user, "answer_b")
    if kind == "pairwise" and pair[0] is not None and pair[1] is not None:
        a, b = pair
        if knobs.judge_garbage_marker and knobs.judge_garbage_marker in a + b:
            return GARBAGE_VERDICT, "stop"
        longer = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
        winner = {
            "longer": longer,
            "first": "A",
            "longer_if_first": "A" if longer == "A" else "tie",
            "tie": "tie",
        }[knobs.judge_pairwise]
        reason = f"rule {knobs.judge_pairwise}: lengths {len(a)} and {len(b)}"
        if structured:
            return json.dumps({"winner": winner, "reason": reason}), "stop"
        return f"Winner: {winner}\nReason: {reason}", "stop"
    answer = _tagged(user, "answer") or ""
    if knobs.judge_garbage_marker and knobs.judge_garbage_marker in answer:
        return GARBAGE_VERDICT, "stop"
    low = bool(knobs.judge_low_marker and knobs.judge_low_marker in answer)
    score = knobs.judge_low_score if low else knobs.judge_score
    reason = "marked as a poor answer" if low else "a fair answer"
    names = _CRITERIA.findall(system)
    if structured:
        verdict = {"scores": dict.fromkeys(names, score), "reason": reason}
        return json.dumps(verdict), "stop"
    lines = [f"{name}: {score}/10" for name in names] + [f"reason: {reason}"]
    return "\n".join(lines), "stop"


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

_EXPANSION_N = re.compile(r"generate\s+(\d+)\s+more", re.IGNORECASE)

_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided", "invalid_request_error", "invalid_api_key"),
    403: (
        "You are not allowed to sample from this model",
        "invalid_request_error",
        "model_not_allowed",
    ),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: (
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        "insufficient_quota",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


def _error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )


def _status_error(status: int, headers: dict[str, str] | None = None) -> web.Response:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    fallback = (f"Error {status}", kind, None)
    message, kind, code = _STATUS_ERRORS.get(status, fallback)
    return _error(status, message, kind, code, headers)


def format_duration(seconds: float) -> str:
    """OpenAI's reset-header duration: "250ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


def _uniform(digest: bytes, salt: str) -> tuple[float, int]:
    """A deterministic draw in [0, 1) and an integer from a body hash and a salt (cheap)."""
    mixed = hashlib.sha256(digest + salt.encode()).digest()
    return int.from_bytes(mixed[:8], "big") / 2.0**64, int.from_bytes(mixed[8:16], "big")


class _Window:
    """A sliding window (`length` seconds) of (time, cost) entries with a running total."""

    def __init__(self) -> None:
        self.entries: collections.deque[tuple[float, int]] = collections.deque()
        self.total = 0
        self.length = 60.0

    def purge(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.length:
            self.total -= self.entries.popleft()[1]

    def wait_for(self, room: int, now: float) -> float:
        """Seconds until `room` units free up (total <= limit - cost, given as room to free)."""
        freed = 0
        for at, cost in self.entries:
            freed += cost
            if freed >= room:
                return max(0.001, at + self.length - now)
        return self.length

    def reset(self, now: float) -> float:
        """Seconds until the oldest entry leaves the window (when room next opens up)."""
        return self.entries[0][0] + self.length - now if self.entries else 0.0


class _Core:
    """Request handling on one event loop; counters guarded by a lock for readers elsewhere."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.lock = threading.Lock()
        self.stats = Stats()
        self._busy = 0
        self._queued = 0  # waiting for a slot
        self._cond: asyncio.Condition | None = None
        self._requests = _Window()
        self._tokens = _Window()
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/_stats", self.stats_view)
        return app

    async def stats_view(self, request: web.Request) -> web.Response:
        """The counters (Stats.summary) of a server running as its own process."""
        with self.lock:
            return web.json_response(self.stats.summary())

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": "fake-teacher", "object": "model", "created": 0, "owned_by": "distillery"}]
        return web.json_response({"object": "list", "data": data})

    # Slots: a counter and a condition, so a runtime change of knobs.slots takes effect.
    async def _acquire(self) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            if self._busy >= max(1, self.knobs.slots):
                self._queued += 1
                with self.lock:
                    self.stats.max_queued = max(self.stats.max_queued, self._queued)
                try:
                    await self._cond.wait_for(lambda: self._busy < max(1, self.knobs.slots))
                finally:
                    self._queued -= 1
            self._busy += 1
            busy = self._busy
        with self.lock:
            self.stats.max_in_flight = max(self.stats.max_in_flight, busy)

    async def _release(self) -> None:
        assert self._cond is not None
        async with self._cond:
            self._busy -= 1
            self._cond.notify(max(1, self.knobs.slots - self._busy))

    def _rate_check(self, cost: int) -> tuple[dict[str, str], web.Response | None]:
        """Headers for the response, and a 429 when over the rpm or tpm window."""
        knobs = self.knobs
        if not knobs.rpm and not knobs.tpm:
            return {}, None
        now = time.monotonic()
        headers: dict[str, str] = {}
        limited: tuple[str, float, str] | None = None
        share = knobs.rate_window / 60.0
        rpm = max(1, int(knobs.rpm * share)) if knobs.rpm else 0  # allowed in one window
        tpm = max(1, int(knobs.tpm * share)) if knobs.tpm else 0
        self._requests.length = self._tokens.length = knobs.rate_window
        if knobs.rpm:
            self._requests.purge(now)
            if len(self._requests.entries) + 1 > rpm:
                wait = self._requests.wait_for(len(self._requests.entries) + 1 - rpm, now)
                limited = (
                    "requests",
                    wait,
                    f"Rate limit reached for requests per min (RPM): "
                    f"Limit {knobs.rpm}, Used {len(self._requests.entries)}, Requested 1.",
                )
        if knobs.tpm:
            self._tokens.purge(now)
            if limited is None and self._tokens.total + cost > tpm:
                wait = (
                    self._tokens.wait_for(self._tokens.total + cost - tpm, now)
                    if cost <= tpm
                    else knobs.rate_window
                )
                limited = (
                    "tokens",
                    wait,
                    f"Rate limit reached for tokens per min (TPM): "
                    f"Limit {knobs.tpm}, Used {self._tokens.total}, Requested {cost}.",
                )
        if limited is None:
            if knobs.rpm:
                self._requests.entries.append((now, 1))
                self._requests.total += 1
            if knobs.tpm:
                self._tokens.entries.append((now, cost))
                self._tokens.total += cost
        if knobs.rpm:
            headers["x-ratelimit-limit-requests"] = str(knobs.rpm)
            headers["x-ratelimit-remaining-requests"] = str(
                max(0, rpm - len(self._requests.entries))
            )
            headers["x-ratelimit-reset-requests"] = format_duration(self._requests.reset(now))
        if knobs.tpm:
            headers["x-ratelimit-limit-tokens"] = str(knobs.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self._tokens.total))
            headers["x-ratelimit-reset-tokens"] = format_duration(self._tokens.reset(now))
        if limited is None:
            return headers, None
        kind, wait, message = limited
        headers["retry-after"] = f"{wait:.3f}".rstrip("0").rstrip(".")
        headers["retry-after-ms"] = str(math.ceil(wait * 1000))
        with self.lock:
            self.stats.rate_limited += 1
        return headers, _error(429, message, kind, "rate_limit_exceeded", headers)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        knobs = self.knobs
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            with self.lock:
                self.stats.received += 1
                self.stats.rejected += 1
            return _error(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
        key = digest.hex()
        with self.lock:
            stats = self.stats
            stats.received += 1
            attempt = stats.received_by_body[key]
            stats.received_by_body[key] = attempt + 1
            if stats.answered_by_body.get(key, 0) >= 1:
                stats.resent_after_answer += 1
            response_format = body.get("response_format")
            asked = response_format.get("type") if isinstance(response_format, dict) else None
            stats.received_by_form[asked or "text"] += 1

        if knobs.status is not None:
            with self.lock:
                self.stats.rejected += 1
            return _status_error(knobs.status)
        response_format = body.get("response_format")
        form = response_format.get("type") if isinstance(response_format, dict) else None
        if knobs.reject_json_schema and form == "json_schema":
            with self.lock:
                self.stats.rejected += 1
            if knobs.reject_json_schema_status == 500:
                # What llama-cpp-python 0.3.36's server answers: its request validation error,
                # as a 500.
                message = (
                    "1 validation error: {'type': 'literal_error', 'loc': ('body', "
                    "'response_format', 'type'), 'msg': \"Input should be 'text' or "
                    "'json_object'\", 'input': 'json_schema'}"
                )
                return _error(500, message, "internal_server_error")
            return _error(
                400,
                "response_format json_schema is not supported",
                "invalid_request_error",
                "unsupported_response_format",
            )

        messages = body.get("messages")
        prompt_chars = (
            sum(len(_content_text(m.get("content"))) for m in messages if isinstance(m, dict))
            if isinstance(messages, list)
            else 0
        )
        prompt_tokens = max(1, prompt_chars // 4)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        cost = prompt_tokens + (max_tokens if isinstance(max_tokens, int) else 0)
        headers, limited = self._rate_check(cost)
        if limited is not None:
            return limited

        if knobs.fault_rate > 0 and knobs.faults:
            draw, pick = _uniform(digest, f"{knobs.seed}/fault/{attempt}")
            if draw < knobs.fault_rate:
                fault = knobs.faults[pick % len(knobs.faults)]
                with self.lock:
                    self.stats.faults[fault] += 1
                if fault == "drop":
                    if request.transport is not None:
                        request.transport.close()
                    return web.Response(status=500)  # never reaches the client
                if fault == "429":  # a provider's transient limit: short Retry-After
                    retry = {**headers, "retry-after": "0.2", "retry-after-ms": "200"}
                    message = "Rate limit reached for requests. Please try again in 200ms."
                    return _error(429, message, "requests", "rate_limit_exceeded", retry)
                return _status_error(int(fault) if fault.isdigit() else 500, headers)

        await self._acquire()
        try:
            if knobs.latency > 0:
                await asyncio.sleep(knobs.latency)
            content, finish = self._content(body, form, response_format, digest, knobs)
            kind = judge_kind(body)
            if kind is not None:
                with self.lock:
                    self.stats.judged[kind] += 1
        finally:
            await self._release()

        completion_tokens = max(1, len(content) // 4)
        number = next(self._ids)
        reply = {
            "id": f"chatcmpl-{self._id_prefix}{number:09d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or "fake-teacher",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake_teacher",
        }
        headers["x-request-id"] = f"req_{self._id_prefix}{number:09d}"
        with self.lock:
            self.stats.answered += 1
            self.stats.answered_by_body[key] += 1
        return web.Response(
            body=json.dumps(reply).encode(), content_type="application/json", headers=headers
        )

    @staticmethod
    def _content(
        body: dict[str, Any], form: Any, response_format: Any, digest: bytes, knobs: Knobs
    ) -> tuple[str, str]:
        judged = judge_reply(body, form, knobs)
        if judged is not None:
            return judged
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        if knobs.reply == "prose":
            return gen_prose(rng), "stop"
        schema: Any = None
        if form == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
        elif form == "json_object":
            schema = response_format.get("schema")
        if form in ("json_schema", "json_object"):
            data = gen_from_schema(schema or {"type": "object"}, rng)
            draw, pick = _uniform(digest, f"{knobs.seed}/plant")
            if knobs.planted and draw < knobs.plant_rate and isinstance(data.get("examples"), list):
                ctx, question = knobs.planted[pick % len(knobs.planted)]
                data["examples"][:1] = [{"user_context": ctx, "question": question}]
            text = json.dumps(data)
            if knobs.reply == "malformed_json":
                text = text[: max(2, int(len(text) * rng.uniform(0.3, 0.7)))]
                text = text.rstrip("}]") + ", "
            return text, "stop"
        user_text = _last_user_text(body.get("messages"))
        if "more examples" in user_text:
            found = _EXPANSION_N.search(user_text)
            return gen_examples_text(rng, int(found.group(1)) if found else 3), "stop"
        answer = gen_answer(rng, _question_of(user_text))
        draw, _ = _uniform(digest, f"{knobs.seed}/answer")
        if draw < knobs.refusal_rate:
            return REFUSAL, "stop"
        if draw < knobs.refusal_rate + knobs.truncate_rate:
            return _truncate(rng, answer), "length"
        return answer, "stop"

    async def serve(self, port: int, ready: Callable[[int], None], stop: asyncio.Event) -> None:
        # A condition belongs to one loop (restarts make new ones).
        self._cond, self._busy, self._queued = None, 0, 0
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
            await site.start()
            ready(int(runner.addresses[0][1]))
            await stop.wait()
        finally:
            await runner.cleanup()


class FakeTeacher:
    """The fake teacher in a background thread with its own event loop (for sync tests)."""

    def __init__(self, knobs: Knobs | None = None, port: int = 0) -> None:
        self.knobs = knobs if knobs is not None else Knobs()
        self.port = port
        self.url = ""
        self._core = _Core(self.knobs)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    @knobs.setter
    def knobs(self, value: Knobs) -> None:
        self._knobs = value
        if hasattr(self, "_core"):
            self._core.knobs = value

    @property
    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        with self._core.lock:
            return self._core.stats.copy()

    def reset_stats(self) -> None:
        with self._core.lock:
            self._core.stats = Stats()

    def start(self) -> FakeTeacher:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error, self.url = None, ""
        self._thread = threading.Thread(target=self._run, name="fake-teacher", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"fake teacher failed to start: {self._error}") from self._error
        if not self.url:
            raise RuntimeError("fake teacher did not start within 30 s")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self._core.serve(self.port, self._on_ready, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
        finally:
            self._ready.set()

    def _on_ready(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> FakeTeacher:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Standalone process
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> tuple[Knobs, int]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--rate-window", type=float, default=60.0, help="seconds (rpm pro rata)")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default="500,503,drop", help="comma-separated: 500,503,drop")
    parser.add_argument("--reply", choices=("normal", "prose", "malformed_json"), default="normal")
    parser.add_argument("--status", type=int, default=None)
    parser.add_argument("--reject-json-schema", action="store_true")
    parser.add_argument("--truncate-rate", type=float, default=0.0)
    parser.add_argument("--refusal-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    knobs = Knobs(
        latency=args.latency,
        slots=args.slots,
        rpm=args.rpm,
        tpm=args.tpm,
        rate_window=args.rate_window,
        fault_rate=args.fault_rate,
        faults=tuple(f.strip() for f in args.faults.split(",") if f.strip()),
        reply=args.reply,
        status=args.status,
        reject_json_schema=args.reject_json_schema,
        truncate_rate=args.truncate_rate,
        refusal_rate=args.refusal_rate,
        seed=args.seed,
    )
    return knobs, args.port


def spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start the server as its own process (command-line flags); returns it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--port", "0", *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"the fake teacher did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def main(argv: list[str] | None = None) -> int:
    knobs, port = _parse_args(argv)
    core = _Core(knobs)

    def ready(bound: int) -> None:
        print(f"READY http://127.0.0.1:{bound}/v1", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await core.serve(port, ready, stop)

    asyncio.run(run())
    with core.lock:
        print(json.dumps(core.stats.summary()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
