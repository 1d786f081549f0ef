"""bench.retrieval end to end: the served all-MiniLM-L6-v2 and sentence-transformers in-process
must give the same retrieval metrics on one small BEIR-format dataset.

The dataset is written here: twelve topics, three short documents each, and one or two
queries per topic judged against that topic's documents (the first one more relevant).
"""

import json

import pytest

from bench import retrieval
from testkit.reference import minilm_reference

TOPICS = {
    "volcano": [
        "Volcanoes erupt when molten rock, called magma, rises through cracks in the Earth's crust.",
        "Mount Vesuvius buried the Roman towns of Pompeii and Herculaneum under ash in 79 AD.",
        "Lava flows cool into basalt, a dark and fine-grained igneous rock.",
    ],
    "bread": [
        "Bread dough rises because yeast ferments sugars and releases carbon dioxide gas.",
        "Sourdough uses a starter of wild yeast and lactic acid bacteria instead of baker's yeast.",
        "Kneading develops gluten, the protein network that gives bread its chewy structure.",
    ],
    "chess": [
        "In chess, castling moves the king two squares toward a rook, which jumps over it.",
        "A pawn that reaches the last rank is promoted, usually to a queen.",
        "The Sicilian Defence is a popular reply to the opening move e4.",
    ],
    "photosynthesis": [
        "Plants turn sunlight, water and carbon dioxide into glucose and oxygen by photosynthesis.",
        "Chlorophyll in the chloroplasts absorbs mostly red and blue light and reflects green.",
        "The Calvin cycle fixes carbon from the air into sugars inside the leaf.",
    ],
    "bicycle": [
        "A derailleur moves the chain between sprockets to change a bicycle's gear.",
        "Disc brakes stop a bike by squeezing pads against a rotor mounted on the wheel hub.",
        "Keeping tyres at the right pressure makes cycling faster and prevents pinch flats.",
    ],
    "jazz": [
        "Jazz grew out of blues and ragtime in New Orleans in the early twentieth century.",
        "Miles Davis recorded Kind of Blue, one of the best-selling jazz albums ever made.",
        "Improvisation over chord changes is at the heart of a jazz solo.",
    ],
    "vaccine": [
        "Vaccines train the immune system to recognise a pathogen without causing the disease.",
        "mRNA vaccines give cells instructions to make a harmless piece of the virus's spike protein.",
        "Herd immunity protects people who cannot be vaccinated when most others are.",
    ],
    "tides": [
        "Ocean tides are caused mainly by the Moon's gravity pulling on the Earth's water.",
        "Spring tides, with the largest range, happen when the Sun and Moon line up.",
        "Most coasts see two high tides and two low tides about every 25 hours.",
    ],
    "coffee": [
        "Espresso is brewed by forcing hot water through finely ground coffee under pressure.",
        "Coffee beans are the roasted seeds of the fruit of the Coffea plant.",
        "Caffeine blocks adenosine receptors in the brain, which makes people feel more alert.",
    ],
    "python": [
        "Python uses indentation rather than braces to mark blocks of code.",
        "A Python list comprehension builds a new list from an iterable in a single expression.",
        "The global interpreter lock lets only one thread run Python bytecode at a time.",
    ],
    "glaciers": [
        "Glaciers form where more snow falls each winter than melts in the summer.",
        "Moving ice carves U-shaped valleys and leaves moraines of rock debris behind.",
        "Many mountain glaciers are shrinking as average temperatures rise.",
    ],
    "honeybees": [
        "Honeybees perform a waggle dance to tell the hive where flowers are.",
        "Worker bees make honey by evaporating water from flower nectar.",
        "A colony has one queen, thousands of female workers and a few male drones.",
    ],
}
QUERIES = {
    "volcano": ["why do volcanoes erupt", "which city was destroyed by Vesuvius"],
    "bread": ["what makes bread dough rise"],
    "chess": ["how does castling work", "what happens when a pawn reaches the end of the board"],
    "photosynthesis": ["how do plants make food from sunlight"],
    "bicycle": ["how do I change gears on my bike"],
    "jazz": ["where did jazz music come from"],
    "vaccine": ["how vaccines protect against disease", "how do mRNA vaccines work"],
    "tides": ["what causes high and low tide"],
    "coffee": ["how is espresso brewed"],
    "python": ["how are code blocks delimited in python"],
    "glaciers": ["how are glaciers formed"],
    "honeybees": ["how bees communicate the location of food", "how do bees make honey"],
}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir-small")
    (root / "qrels").mkdir()
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for topic, docs in TOPICS.items():
        doc_ids = [f"{topic}-{i}" for i in range(len(docs))]
        corpus += [{"_id": did, "title": topic.capitalize(), "text": text} for did, text in zip(doc_ids, docs)]
        for j, query in enumerate(QUERIES[topic]):
            qid = f"q-{topic}-{j}"
            queries.append({"_id": qid, "text": query})
            # The document the query paraphrases is the most relevant; its topic's others less so.
            qrels += [f"{qid}\t{did}\t{2 if i == j else 1}" for i, did in enumerate(doc_ids)]
    queries.append({"_id": "q-unjudged", "text": "this query has no judgements and is skipped"})
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return root


def test_served_metrics_equal_sentence_transformers_in_process(dataset_dir, base_url, api_keys, tmp_path, monkeypatch):
    data = retrieval.load_beir(dataset_dir)
    assert len(data.docs) == 36 and len(data.queries) == 16  # the unjudged query is dropped
    assert data.docs[0] == "Volcano " + TOPICS["volcano"][0]

    monkeypatch.setenv("OPENAI_API_KEY", api_keys.tester)
    out = tmp_path / "retrieval_small"
    argv = ["--url", base_url, "--model", "all-MiniLM-L6-v2", "--dataset", str(dataset_dir),
            "--out", str(out), "--batch-size", "8", "--concurrency", "2"]
    assert retrieval.main(argv) == 0
    served = json.loads((out.parent / "retrieval_small.json").read_text())
    assert api_keys.tester not in (out.parent / "retrieval_small.json").read_text()
    assert "nDCG@10" in (out.parent / "retrieval_small.md").read_text()

    # all-MiniLM-L6-v2 has no query instruction: queries and documents are encoded alike.
    in_process = retrieval.evaluate(data, minilm_reference, minilm_reference)
    assert served["queries"] == in_process["queries"] == 16
    assert served["documents"] == in_process["documents"] == 36
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert served["metrics"][name] == pytest.approx(in_process["metrics"][name], abs=1e-4), name
    # Real retrieval, not a degenerate ranking: MiniLM finds the topic's documents.
    assert in_process["metrics"]["ndcg@10"] > 0.7
    assert in_process["metrics"]["recall@100"] == 1.0  # 36 documents: every one is ranked


def test_metrics_come_from_trec_eval_on_a_known_ranking():
    """A hand-checkable ranking: one query, relevant documents at ranks 2 and 4."""
    import numpy as np

    data = retrieval.Dataset(
        doc_ids=["a", "b", "c", "d"], docs=[""] * 4, query_ids=["q"], queries=[""],
        qrels={"q": {"b": 1, "d": 1}},
    )
    top_idx = np.array([[0, 1, 2, 3]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    m = retrieval.metrics(data, top_idx, scores)
    ideal = 1 + 1 / np.log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / ideal)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@100"] == 1.0


def test_search_is_exact_cosine():
    import numpy as np

    rng = np.random.default_rng(0)
    docs, queries = rng.normal(size=(50, 8)), rng.normal(size=(3, 8))
    idx, scores = retrieval.search(queries * 3.0, docs, depth=5)  # scale does not matter: cosine
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (docs / np.linalg.norm(docs, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(idx, np.argsort(-cos, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(cos, axis=1)[:, ::-1][:, :5], rtol=1e-6)
