"""Seeded, deterministic request streams for the benchmarks: no data sets, just a word list.

A workload maps a request index to a `Request` (the texts of one `POST /v1/embeddings`), the
same for every system and every run with the same seed. Request `i` is generated from its own
`random.Random` seeded with a string (`random` hashes str seeds with SHA-512, so this does not
depend on PYTHONHASHSEED), so any index can be produced on its own, in any order.

    search  32 clients, one query of 5–15 words per request
    bulk     8 clients, 64 documents of 20–300 words per request
    mixed   16 clients, 75 % search-like and 25 % bulk-like requests
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# A few hundred common English words: enough variety that the tokenizer sees ordinary text,
# ~1.2 word-pieces per word for a BERT vocabulary.
WORDS = tuple(dict.fromkeys(
    """
    time year people way day man thing woman life child world school state family student
    group country problem hand part place case week company system program question work
    government number night point home water room mother area money story fact month lot
    right study book eye job word business issue side kind head house service friend father
    power hour game line end member law car city community name president team minute idea
    kid body information back parent face others level office door health person art war
    history party result change morning reason research girl guy moment air teacher force
    education foot boy age policy music market sense nation plan college interest death
    experience effect use class control care field development role effort rate heart drug
    show leader light voice wife police mind price report decision son view relationship
    town road arm difference value building action model season society tax director position
    player record paper space ground form event official matter center couple site project
    activity star table need court oil situation cost industry figure street image phone data
    picture practice piece land product doctor wall patient worker news test movie north love
    support technology step baby computer type attention film tree source organization hair
    window evidence population site energy garden river mountain ocean forest island bridge
    engine network signal memory search query vector model embedding language sentence text
    document token batch server client request response latency cache queue budget replica
    cluster machine kernel memory thread process storage database index shard schema cloud
    weather summer winter spring autumn coffee bread apple orange recipe kitchen dinner lunch
    be have do say go can get make know think take see come want look give find tell ask
    seem feel try leave call keep let begin help show hear play run move like live believe
    hold bring happen write provide sit stand lose pay meet include continue set learn lead
    understand watch follow stop create speak read allow add spend grow open walk win offer
    remember consider appear buy wait serve die send expect build stay fall cut reach kill
    remain suggest raise pass sell require report decide pull explain compare measure train
    good new first last long great little own other old big high different small large next
    early young important few public bad same able late hard major better economic strong
    possible whole free military true federal international full special easy clear recent
    certain personal open red difficult available likely short single medical current wrong
    private past foreign fine common poor natural significant similar hot dead central happy
    serious ready simple left physical general environmental financial blue democratic dark
    various entire close legal religious cold final main green nice huge popular traditional
    cultural quick slow quiet bright heavy light fast cheap rich deep warm fresh clean safe
    very often also still never always really almost already together however perhaps maybe
    quickly slowly probably usually simply actually nearly finally clearly exactly recently
    about after before between during through under without within against across toward
    """.split()
))

# Words a search query tends to start with.
QUERY_STARTS = ("how", "what", "why", "where", "when", "which", "best", "cheap", "who", "is")


@dataclass(frozen=True)
class Request:
    """One embeddings request: its texts, and a tag naming its kind (for per-kind latencies)."""

    index: int
    texts: tuple[str, ...]
    tag: str


def make_query(rng: random.Random, min_words: int, max_words: int) -> str:
    n = rng.randint(min_words, max_words)
    words = [rng.choice(QUERY_STARTS)] if rng.random() < 0.4 else []
    words += rng.choices(WORDS, k=n - len(words))
    text = " ".join(words)
    return text + "?" if words[0] in QUERY_STARTS else text


def make_document(rng: random.Random, min_words: int, max_words: int) -> str:
    """Sentences of 6–18 words, capitalised, with the odd comma: prose-shaped text."""
    n = rng.randint(min_words, max_words)
    words = rng.choices(WORDS, k=n)
    out, start = [], 0
    while start < n:
        end = min(n, start + rng.randint(6, 18))
        sentence = words[start:end]
        if len(sentence) > 8 and rng.random() < 0.5:
            k = rng.randint(3, len(sentence) - 3)
            sentence[k] += ","
        out.append(" ".join(sentence).capitalize() + ".")
        start = end
    return " ".join(out)


@dataclass
class Workload:
    """A named, seeded request stream with the concurrency it is meant to be driven at."""

    name: str
    concurrency: int
    description: str
    seed: int = 0
    query_words: tuple[int, int] = (5, 15)
    doc_words: tuple[int, int] = (20, 300)
    docs_per_request: int = 64
    bulk_share: float = 0.0  # probability that a request is bulk-like (1.0: all bulk)
    cache: bool = True  # False: generate each request anew (a long run's memory stays flat)
    _cache: dict[int, Request] = field(default_factory=dict, repr=False)

    def request(self, index: int) -> Request:
        cached = self._cache.get(index)
        if cached is None:
            cached = self._generate(index)
            if self.cache:
                self._cache[index] = cached
        return cached

    __call__ = request

    def prefetch(self, n: int) -> None:
        """Generate requests 0..n-1 now, so that generating them costs nothing during a run."""
        for i in range(n):
            self.request(i)

    def _generate(self, index: int) -> Request:
        rng = random.Random(f"{self.name}:{self.seed}:{index}")
        if rng.random() < self.bulk_share:
            texts = tuple(make_document(rng, *self.doc_words) for _ in range(self.docs_per_request))
            return Request(index, texts, "bulk")
        return Request(index, (make_query(rng, *self.query_words),), "search")


def search(seed: int = 0, concurrency: int = 32) -> Workload:
    return Workload("search", concurrency, "one query of 5-15 words per request", seed, bulk_share=0.0)


def bulk(seed: int = 0, concurrency: int = 8) -> Workload:
    return Workload("bulk", concurrency, "64 documents of 20-300 words per request", seed, bulk_share=1.0)


def mixed(seed: int = 0, concurrency: int = 16) -> Workload:
    return Workload(
        "mixed", concurrency, "75% search-like (1 query), 25% bulk-like (64 documents) requests", seed,
        bulk_share=0.25,
    )


def corpus(concurrency: int = 8) -> Workload:
    """Documents to index (bench.batch_job, the batch job's fault scenario): 64 of 20-150 words per request."""
    return Workload("batch-corpus", concurrency, "64 documents of 20-150 words per request", doc_words=(20, 150),
                    bulk_share=1.0)


WORKLOADS = {"search": search, "bulk": bulk, "mixed": mixed}


def get(name: str, seed: int = 0, concurrency: int | None = None) -> Workload:
    """A workload by name; `concurrency` overrides its default number of clients."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}") from None
    return factory(seed) if concurrency is None else factory(seed, concurrency)
