import bz2
import json
from collections import Counter

import pytest

from repro.data.text import corpus_fingerprint, load_corpus
from repro.errors import MissingResource


def test_pydoc_topics_is_english_prose():
    texts = load_corpus("pydoc_topics")
    assert len(texts) > 500
    words = [w.lower().strip('.,;:()"') for t in texts for w in t.split()]
    assert len(words) > 20_000
    common = Counter(words).most_common(5)
    assert {"the", "of", "a", "is", "to"} & {w for w, _ in common}, common
    # Code blocks, grammar productions and headings underlines are removed.
    assert not any("::=" in t or ">>>" in t or "*****" in t for t in texts)
    assert all(len(t.split()) >= 8 and "\n" not in t for t in texts)


def test_pydoc_topics_is_deterministic_and_respects_max_chars():
    a = load_corpus("pydoc_topics", max_chars=5_000)
    b = load_corpus("pydoc_topics", max_chars=5_000)
    assert a == b
    assert 0 < sum(len(t) for t in a) <= 5_000
    assert corpus_fingerprint(a) == corpus_fingerprint(b)
    assert corpus_fingerprint(a) != corpus_fingerprint(load_corpus("pydoc_topics", max_chars=8_000))


def test_fingerprint_counts_document_boundaries():
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])


def test_wikipedia_abstracts_missing_file_says_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv("REPRO_WIKIPEDIA_ABSTRACTS", raising=False)
    with pytest.raises(MissingResource, match="dumps.wikimedia.org"):
        load_corpus("wikipedia_abstracts")
    with pytest.raises(MissingResource, match="not a file"):
        load_corpus("wikipedia_abstracts", path=tmp_path / "nope.txt")


ABSTRACTS = [
    "Anarchism is a political philosophy and movement that is sceptical of authority.",
    "Albedo is the fraction of sunlight that is diffusely reflected by a body, such as a planet.",
]


def test_wikipedia_abstracts_formats(tmp_path, monkeypatch):
    txt = tmp_path / "abstracts.txt"
    txt.write_text("\n".join(ABSTRACTS) + "\n\nshort line\n")
    assert load_corpus("wikipedia_abstracts", path=txt) == ABSTRACTS  # the 2-word line is dropped

    jsonl = tmp_path / "abstracts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"title": str(i), "abstract": a}) for i, a in enumerate(ABSTRACTS)))
    assert load_corpus("wikipedia_abstracts", path=jsonl) == ABSTRACTS

    xml = tmp_path / "enwiki-latest-abstract.xml"
    xml.write_text("<feed>\n" + "\n".join(f"<doc><abstract>{a}</abstract></doc>" for a in ABSTRACTS) + "\n</feed>\n")
    assert load_corpus("wikipedia_abstracts", path=xml) == ABSTRACTS

    ttl = tmp_path / "long-abstracts_lang=en.ttl.bz2"
    lines = [f'<http://dbpedia.org/resource/X{i}> <http://dbpedia.org/ontology/abstract> "{a}"@en .' for i, a in enumerate(ABSTRACTS)]
    lines.append(
        "<http://dbpedia.org/resource/Y> <http://dbpedia.org/ontology/abstract> "
        r'"Caf\u00E9 society is described as a \"set\" of people who met in caf\u00E9s."@en .'
    )
    ttl.write_bytes(bz2.compress("\n".join(lines).encode()))
    texts = load_corpus("wikipedia_abstracts", path=ttl)
    assert texts[:2] == ABSTRACTS
    assert texts[2] == 'Café society is described as a "set" of people who met in cafés.'

    monkeypatch.setenv("REPRO_WIKIPEDIA_ABSTRACTS", str(txt))
    assert load_corpus("wikipedia_abstracts", max_chars=len(ABSTRACTS[0]) + 1) == ABSTRACTS[:1]


def test_unknown_corpus_and_missing_wordnet(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("imagenet")
    with pytest.raises(MissingResource, match="wordnet-base"):
        load_corpus("wordnet_glosses", path=tmp_path)


def test_wordnet_glosses_from_files(tmp_path):
    header = "  1 This software and database is being provided to you, the LICENSEE, by\n"
    entry = (
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred "
        "to have its own distinct existence (living or nonliving)  \n"
    )
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text(header + (entry if pos == "noun" else ""))
    texts = load_corpus("wordnet_glosses", path=tmp_path)
    assert texts == ["that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"]
