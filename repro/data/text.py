"""Offline English text corpora for the language-model sparsity experiments.

The paper (Deng, Tao, Benton 2023) ran its models on **Wikipedia abstracts** (per an ICLR 2024 reviewer; the body
of the paper is not available). Those need a user-provided file, so offline runs use English prose that ships with
the environment:

* ``pydoc_topics``: the help-topic texts of Python's standard library (``pydoc_data.topics``, about 65k words of
  technical English). Headings, code blocks and grammar productions are removed; each remaining paragraph is one
  document, roughly the length of an abstract. Always available, no download.
* ``wordnet_glosses``: WordNet glosses and example sentences, when Debian's ``wordnet-base`` is installed
  (``apt-get install wordnet-base``; files under ``/usr/share/wordnet``). Optional.
* ``wikipedia_abstracts``: the paper-scale corpus, one abstract per document, read from a user file.

Every loader returns ``list[str]`` in a deterministic order, so a hash of the list identifies the corpus.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from repro.errors import MissingResource

CORPORA = ("pydoc_topics", "wordnet_glosses", "wikipedia_abstracts")

WIKIPEDIA_ENV = "REPRO_WIKIPEDIA_ABSTRACTS"
WORDNET_DIR = Path("/usr/share/wordnet")

_WIKIPEDIA_HELP = (
    "the 'wikipedia_abstracts' corpus needs a local file of English Wikipedia abstracts. Pass path=... (in a spec: "
    "the setting corpus_path) or set "
    f"${WIKIPEDIA_ENV}. Accepted formats (optionally .gz/.bz2): plain text with one abstract per line; JSON lines with "
    "an 'abstract' or 'text' field; the Wikimedia dump enwiki-latest-abstract.xml "
    "(https://dumps.wikimedia.org/enwiki/latest/); or DBpedia long/short abstracts in N-Triples/Turtle "
    "(https://databus.dbpedia.org/dbpedia/text/long-abstracts, file long-abstracts_lang=en.ttl.bz2)."
)


def load_corpus(name: str = "pydoc_topics", path: str | os.PathLike | None = None, max_chars: int | None = None,
                min_words: int = 8) -> list[str]:
    """Return the documents of an English corpus, in a fixed order, up to ``max_chars`` characters in total.

    ``min_words`` drops fragments (headings, one-line captions) that carry little context for the model.
    """
    if name == "pydoc_topics":
        documents: Iterable[str] = _pydoc_paragraphs()
    elif name == "wordnet_glosses":
        documents = _wordnet_glosses(Path(path) if path else WORDNET_DIR)
    elif name == "wikipedia_abstracts":
        path = path or os.environ.get(WIKIPEDIA_ENV)
        if not path or not Path(path).is_file():
            where = f" ({path!r} is not a file)" if path else ""
            raise MissingResource(_WIKIPEDIA_HELP + where)
        documents = _wikipedia_abstracts(Path(path))
    else:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")

    texts: list[str] = []
    total = 0
    for doc in documents:
        doc = _normalize_space(doc)
        if len(doc.split()) < min_words:
            continue
        if max_chars is not None and total + len(doc) > max_chars:
            if not texts:  # never return nothing because the first document is long
                texts.append(doc[:max_chars])
            break
        texts.append(doc)
        total += len(doc)
    if not texts:
        raise MissingResource(f"corpus {name!r} yielded no documents with at least {min_words} words")
    return texts


def corpus_fingerprint(texts: list[str]) -> str:
    """sha256 of the documents (length-prefixed, so document boundaries count), for cache keys."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --- pydoc_data.topics -------------------------------------------------------------------------------------------

def _normalize_space(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(paragraph: str) -> bool:
    """Heuristic: mostly letters, ends like a sentence, no grammar productions or interpreter prompts."""
    if "::=" in paragraph or ">>>" in paragraph or paragraph.startswith("-["):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters / max(len(paragraph), 1) > 0.85 and paragraph[-1:] in ".:?!)"


def _pydoc_paragraphs() -> Iterator[str]:
    """Prose paragraphs of the Python help topics (headings, code, grammar and footnote markers removed)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = [line for line in block.split("\n") if line.strip()]
            # A heading is a line underlined with *, = or -; drop the underline and the heading.
            lines = [line for i, line in enumerate(lines)
                     if not re.fullmatch(r"\s*[*=\-~^]{3,}\s*", line)
                     and not (i + 1 < len(lines) and re.fullmatch(r"\s*[*=\-~^]{3,}\s*", lines[i + 1]))]
            if not lines:
                continue
            first = lines[0]
            stripped = first.lstrip()
            if stripped.startswith(("* ", "- ")):
                lines[0] = stripped[2:]  # a bullet item is prose
            elif len(first) - len(stripped) >= 3:
                continue  # an indented block is code or a grammar production
            paragraph = _normalize_space(" ".join(lines))
            if paragraph and _is_prose(paragraph):
                yield paragraph


# --- WordNet (optional, Debian wordnet-base) -----------------------------------------------------------------------

def _wordnet_glosses(directory: Path) -> Iterator[str]:
    files = [directory / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise MissingResource(f"WordNet data files not found under {directory}; install them with "
                              "'apt-get install wordnet-base' (or pass path= to a folder holding data.noun etc.)")
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(" ") or "|" not in line:
                    continue  # licence header
                gloss = line.split("|", 1)[1].strip()
                # Glosses read 'definition; "example one"; "example two"': keep them as one short document.
                yield gloss.replace('"', "")


# --- Wikipedia abstracts (paper scale, user file) ------------------------------------------------------------------

def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


_TTL_ABSTRACT = re.compile(r'^<[^>]*>\s+<[^>]*(?:abstract|comment)>\s+"(.*)"@en\s*\.\s*$')
_XML_ABSTRACT = re.compile(r"<abstract>(.*?)</abstract>")
_NT_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")


def _unescape_ntriples(literal: str) -> str:
    """Undo N-Triples string escapes (\\uXXXX, \\", \\n, ...) without touching raw UTF-8."""
    simple = {"n": " ", "t": " ", "r": " ", '"': '"', "\\": "\\", "'": "'"}

    def replace(match: re.Match) -> str:
        code = match.group(1)
        if code[0] in "uU" and len(code) > 1:
            return chr(int(code[1:], 16))
        return simple.get(code, code)

    return _NT_ESCAPE.sub(replace, literal)


def _wikipedia_abstracts(path: Path) -> Iterator[str]:
    name = path.name.lower()
    for suffix in (".gz", ".bz2"):
        name = name.removesuffix(suffix)
    with _open_text(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            if name.endswith((".jsonl", ".json")):
                record = json.loads(line)
                text = record.get("abstract") or record.get("text") or ""
            elif name.endswith(".xml"):
                match = _XML_ABSTRACT.search(line)
                text = match.group(1) if match else ""
            elif name.endswith((".ttl", ".nt")):
                match = _TTL_ABSTRACT.match(line)
                text = _unescape_ntriples(match.group(1)) if match else ""
            else:
                text = line
            if text:
                yield text
