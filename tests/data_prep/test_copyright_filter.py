"""Tests for the copyright-risk filter: each signal, the composite, the datatrove step, the report, the CLI."""
from __future__ import annotations

import argparse
import json
import pickle

import pytest
from datatrove.data import Document

from engmoe.data_prep.copyright.blocklist import BlocklistError, load_blocklist, match_domain
from engmoe.data_prep.copyright.cli import register
from engmoe.data_prep.copyright.report import filter_report
from engmoe.data_prep.copyright.signals import (
    PAGE_RUN_MARKERS,
    SIGNALS,
    _normalise_isbn,
    count_editorial,
    find_dois,
    score_document,
)
from engmoe.data_prep.copyright.step import CopyrightRiskFilter

_SENTENCES = (
    "The river was low this summer and the boats stayed in the harbour for weeks.",
    "Our team measured the soil moisture every morning before the sun rose.",
    "Several volunteers repainted the benches along the northern path of the park.",
    "The recipe calls for two cups of flour, a pinch of salt and some patience.",
    "Trains to the coast leave every hour, except on public holidays.",
    "She kept a notebook of birds she had seen from the kitchen window.",
)


def prose(n_chars: int) -> str:
    """Neutral filler text of at least ``n_chars`` characters, split into short paragraphs."""
    out, i = [], 0
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(_SENTENCES[i % len(_SENTENCES)])
        i += 1
    return "\n".join(" ".join(out[j:j + 3]) for j in range(0, len(out), 3))


@pytest.fixture(scope="module")
def blocklist() -> dict[str, str]:
    return load_blocklist()


# ------------------------------------------------------------------------------------------------ blocklist
def test_shipped_blocklist_has_every_category_and_language(blocklist):
    categories = set(blocklist.values())
    assert categories == {"news", "broadcasters", "academic", "legal", "literary"}
    for category in categories:
        assert sum(1 for c in blocklist.values() if c == category) >= 20, category
    for domain, category in [("corriere.it", "news"), ("lemonde.fr", "news"), ("spiegel.de", "news"),
                             ("elpais.com", "news"), ("rai.it", "broadcasters"), ("elsevier.com", "academic"),
                             ("altalex.com", "legal"), ("einaudi.it", "literary")]:
        assert blocklist[domain] == category


@pytest.mark.parametrize("url, category", [
    ("https://www.nytimes.com/2020/01/01/world/story.html", "news"),
    ("http://edition.cnn.com/x", "broadcasters"),
    ("HTTPS://WWW.Corriere.IT:443/cronaca/", "news"),
    ("nytimes.com/section/arts", "news"),  # no scheme
    ("https://abcnews.go.com/US/story", "broadcasters"),  # subdomain entry
])
def test_domain_signal_matches_domain_and_subdomains(blocklist, url, category):
    result = score_document(prose(1500), url, blocklist)
    assert result.signals.domain == category
    assert result.fired == ("domain",)
    assert result.score >= 0.5  # a blocklisted domain alone scores high


@pytest.mark.parametrize("url", [
    "https://notnytimes.com/a", "https://nytimes.com.evil.net/a", "https://www.go.com/x", "https://example.org",
    "", None, "http://[::1/broken",
])
def test_domain_signal_ignores_lookalikes_and_missing_urls(blocklist, url):
    result = score_document(prose(1500), url, blocklist)
    assert result.signals.domain is None
    assert result.score == 0.0 and result.fired == ()


def test_custom_blocklist_file_and_comments(tmp_path):
    path = tmp_path / "domains.txt"
    path.write_text("# my list\n# category: news\nexample.com  # trailing comment\n\n# category: legal\nLAW.Example.ORG\n")
    blocklist = load_blocklist(path)
    assert blocklist == {"example.com": "news", "law.example.org": "legal"}
    assert score_document("hello", "https://a.law.example.org/x", blocklist).signals.domain == "legal"
    assert match_domain("https://a.law.example.org/x", blocklist) == ("law.example.org", "legal")


@pytest.mark.parametrize("content, message", [
    ("example.com\n", r"domains.txt:1: domain 'example.com' comes before any '# category"),
    ("# category: news\nhttps://example.com/\n", r"domains.txt:2: 'https://example.com/' is not a domain"),
    ("# category: news\nlocalhost\n", r"domains.txt:2: 'localhost' is not a valid domain"),
    ("# category: news\nbad_domain.com\n", r"domains.txt:2: 'bad_domain.com' is not a valid domain"),
    ("# category: news\nwww.example.com\n", r"domains.txt:2: .*starts with www\..*'example.com'"),
    ("# category: news\na.com\n# category: legal\na.com\n",
     r"domains.txt:4: duplicate domain 'a.com' \(first listed on line 2\)"),
    ("# category: \na.com\n", r"domains.txt:1: malformed category header"),
    ("# only comments\n\n", r"domains.txt: no domains found"),
])
def test_blocklist_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "domains.txt"
    path.write_text(content)
    with pytest.raises(BlocklistError, match=message):
        load_blocklist(path)


def test_blocklist_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        load_blocklist(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        CopyrightRiskFilter(blocklist_path=str(tmp_path / "nope.txt"))


# ------------------------------------------------------------------------------------------------ editorial
@pytest.mark.parametrize("lang, lines", [
    ("en", ["CHAPTER ONE", "Chapter 12: The Return", "Table of Contents", "Preface"]),
    ("it", ["Capitolo primo", "CAPITOLO II - La fuga", "Indice", "Prefazione"]),
    ("fr", ["Chapitre 3", "Chapitre IV. Le retour", "Sommaire", "Avant-propos"]),
    ("de", ["Kapitel 1", "Kapitel drei", "Inhaltsverzeichnis", "Vorwort"]),
    ("es", ["Capítulo 1", "Capítulo segundo: El viaje", "Índice", "Prólogo"]),
])
def test_editorial_headings_per_language(blocklist, lang, lines):
    text = "\n\n".join(f"{line}\n{prose(400)}" for line in lines)
    result = score_document(text, None, blocklist)
    assert result.signals.editorial == len(lines), lang
    assert result.fired == ("editorial",)
    assert result.score > 0.3  # four book-structure markers are real evidence


def test_editorial_ignores_headings_inside_prose(blocklist):
    text = ("In chapter 3 of the report the authors discuss costs.\n"
            "Chapter 11 bankruptcy filings rose sharply in the second quarter of the year\n"
            "Bandi e concorsi sono pubblicati ogni mese.\n"
            "The contents of the box were listed on the lid.\n") + prose(500)
    assert score_document(text, None, blocklist).signals.editorial == 0


def test_editorial_table_of_contents_leader_lines(blocklist):
    text = "Contents\nIntroduction .......... 1\nThe first years . . . . . . 17\nCapitolo 3 ………… 45\n" + prose(300)
    assert score_document(text, None, blocklist).signals.editorial == 4  # heading + three leader lines


def test_editorial_page_number_runs(blocklist):
    page = prose(800)
    paginated = f"{page}\n11\n{page}\n- 12 -\n{page}\nPage 13\n{page}"
    assert count_editorial(paginated.lower()) == PAGE_RUN_MARKERS
    # two page numbers are not a run; adjacent numbered lines (pagination links, lists) are not pages
    assert count_editorial(f"{page}\n11\n{page}\n12\n{page}".lower()) == 0
    assert count_editorial(f"{page}\n1\n2\n3\n4\n5\nNext\n{page}".lower()) == 0


# ------------------------------------------------------------------------------------------------ boilerplate
@pytest.mark.parametrize("footer", [
    "© 2021 Example Srl. Tutti i diritti riservati.",
    "© 2021 Example Ltd. All rights reserved.",
    "© 2021 Example SA. Tous droits réservés.",
    "© 2021 Example GmbH. Alle Rechte vorbehalten.",
    "© 2021 Example SL. Todos los derechos reservados.",
])
def test_boilerplate_footer_per_language_scores_low(blocklist, footer):
    short = score_document(prose(600) + "\n" + footer, None, blocklist)
    assert short.signals.boilerplate == 2 and short.fired == ("boilerplate",)
    assert 0.0 < short.score < 0.3  # a footer is not enough on its own
    long_page = score_document(prose(20000) + "\n" + footer, None, blocklist)
    assert long_page.score < short.score  # weak marks are normalised by length


@pytest.mark.parametrize("phrase", ["Tutti i diritti riservati", "All rights reserved", "Tous droits réservés",
                                    "Alle Rechte vorbehalten", "Todos los derechos reservados"])
def test_rights_reserved_phrase_alone_per_language(blocklist, phrase):
    result = score_document(prose(300) + "\n" + phrase + ".", None, blocklist)
    assert result.signals.boilerplate == 1 and result.fired == ("boilerplate",)


def test_single_copyright_sign_on_long_page_scores_low(blocklist):
    result = score_document(prose(10000) + "\nPhoto © Jane Doe", None, blocklist)
    assert result.signals.boilerplate == 1
    assert result.score < 0.05


@pytest.mark.parametrize("notice", [
    "No part of this publication may be reproduced, stored or transmitted without permission.",
    "Riproduzione riservata. Finito di stampare nel mese di marzo.",
    "Achevé d'imprimer en mars. Dépôt légal : mars.",
    "Nachdruck verboten. Die Deutsche Nationalbibliothek verzeichnet diese Publikation.",
    "Queda prohibida la reproducción total o parcial. Depósito legal: M-1234.",
])
def test_publication_notices_per_language(blocklist, notice):
    result = score_document(prose(5000) + "\n" + notice, None, blocklist)
    assert result.signals.boilerplate >= 1 and result.fired == ("boilerplate",)
    assert result.score > 0.3  # a publisher's notice counts fully whatever the length


def test_symbols_and_copyright_lines_are_counted(blocklist):
    text = "Acme® Widget™\nCopyright 2019 Acme\n(c) 2020 Someone\n" + prose(200)
    assert score_document(text, None, blocklist).signals.boilerplate == 4
    assert score_document("The copyright of ideas is a debated topic.", None, blocklist).signals.boilerplate == 0


# ------------------------------------------------------------------------------------------------ identifiers
@pytest.mark.parametrize("snippet, expected", [
    ("ISBN 978-0-306-40615-7", 1),           # valid ISBN-13
    ("ISBN 978-0-306-40615-8", 0),           # bad check digit
    ("ISBN-10: 0-306-40615-2", 1),           # valid ISBN-10
    ("ISBN 0-306-40615-3", 0),               # bad check digit
    ("isbn 0-8044-2957-X", 1),               # X check digit
    ("EAN 9780306406157", 1),                # bare 978 number with a valid check digit
    ("order 9780306406158 shipped", 0),      # bare, invalid
    ("call 0306406152 today", 0),            # bare 10 digits are not treated as an ISBN
    ("ISBN 978-0-306-40615-7 and again ISBN 9780306406157", 1),  # distinct identifiers
])
def test_isbn_detection_validates_check_digits(blocklist, snippet, expected):
    result = score_document(prose(300) + "\n" + snippet, None, blocklist)
    assert result.signals.identifiers == expected
    assert ("identifiers" in result.fired) == (expected > 0)


def test_doi_detection(blocklist):
    text = prose(300) + "\nSee doi:10.1000/182 and https://doi.org/10.1038/nphys1170. Version 10.12/3 is not one."
    assert find_dois(text.lower()) == {"10.1000/182", "10.1038/nphys1170"}
    result = score_document(text, None, blocklist)
    assert result.signals.identifiers == 2 and result.fired == ("identifiers",)
    assert result.score < 0.3  # identifiers alone stay below the thresholds


# ------------------------------------------------------------------------------------------------ composite
def test_editorial_plus_isbn_scores_high(blocklist):
    book = "\n".join(["Prefazione", prose(300), "Capitolo 1", prose(300), "Capitolo 2", prose(300),
                      "Capitolo 3", prose(300), "ISBN 978-88-04-66823-7"])
    assert _normalise_isbn("978-88-04-66823-7") is not None
    result = score_document(book, None, blocklist)
    assert result.signals.editorial == 4 and result.signals.identifiers == 1
    assert result.fired == ("editorial", "identifiers")
    assert result.score > 0.4


def test_score_is_bounded_and_reports_every_signal(blocklist):
    text = "\n".join(["Table of Contents"] + [f"Chapter {i}\n{prose(200)}" for i in range(1, 40)]
                     + ["© 2020 All rights reserved. No part of this book may be reproduced."] * 20
                     + [f"ISBN 978-0-306-40615-7 doi:10.1000/{i}" for i in range(30)])
    result = score_document(text, "https://www.einaudi.it/libro", blocklist)
    assert 0.9 < result.score <= 1.0
    assert result.fired == SIGNALS
    assert score_document("", None, blocklist).score == 0.0


def test_score_document_rejects_bad_types(blocklist):
    with pytest.raises(TypeError, match="text must be str, got bytes"):
        score_document(b"abc", None, blocklist)
    with pytest.raises(TypeError, match="url must be str or None, got int"):
        score_document("abc", 3, blocklist)


# ------------------------------------------------------------------------------------------------ the datatrove step
def _mixed_docs() -> list[Document]:
    """Documents spanning the score range: clean, footer-only, (0.3, 0.4], and clearly risky ones."""
    specs = [
        ("clean", prose(2000), "https://example.org/a"),
        ("footer", prose(600) + "\n© 2021 Example. All rights reserved.", "https://example.org/b"),
        ("three_chapters", "\n".join(f"Chapter {i}\n{prose(300)}" for i in (1, 2, 3)), None),
        ("one_notice", prose(1000) + "\nRiproduzione riservata.", "https://example.org/c"),
        ("news", prose(2000), "https://www.lemonde.fr/article"),
        ("book", "\n".join(["Preface", prose(300)] + [f"Chapter {i}\n{prose(300)}" for i in (1, 2, 3)]
                           + ["ISBN 978-0-306-40615-7"]), None),
    ]
    return [Document(text=text, id=doc_id, metadata={"url": url} if url else {}) for doc_id, text, url in specs]


def _run(step: CopyrightRiskFilter, docs: list[Document]) -> list[Document]:
    return list(step.run(iter(docs)))


def test_threshold_03_drops_more_than_04():
    docs = _mixed_docs()
    kept_03 = {d.id for d in _run(CopyrightRiskFilter(threshold=0.3), _mixed_docs())}
    kept_04 = {d.id for d in _run(CopyrightRiskFilter(threshold=0.4), docs)}
    assert kept_04 == {"clean", "footer", "three_chapters", "one_notice"}
    assert kept_03 == {"clean", "footer"}
    scores = {d.id: d.metadata["copyright_score"] for d in docs}
    assert 0.3 < scores["three_chapters"] <= 0.4 and 0.3 < scores["one_notice"] <= 0.4


def test_score_exactly_at_threshold_is_kept(blocklist):
    doc = _mixed_docs()[2]
    score = score_document(doc.text, None, blocklist).score
    assert [d.id for d in _run(CopyrightRiskFilter(threshold=score), [doc])] == ["three_chapters"]
    assert _run(CopyrightRiskFilter(threshold=score - 1e-6), [_mixed_docs()[2]]) == []


def test_metadata_and_stats_on_every_document():
    docs = _mixed_docs()
    step = CopyrightRiskFilter(threshold=0.4)
    kept = _run(step, docs)
    for doc in docs:  # dropped documents carry the score too (the exclusion writer saves it)
        assert isinstance(doc.metadata["copyright_score"], float)
        assert isinstance(doc.metadata["copyright_signals"], str)
    by_id = {d.id: d for d in docs}
    assert by_id["news"].metadata["copyright_signals"] == "domain"
    assert by_id["book"].metadata["copyright_signals"] == "editorial,identifiers"
    assert by_id["clean"].metadata["copyright_signals"] == ""
    stats = step.stats.to_dict()["stats"]
    assert stats["copyright_seen"] == 6 and stats["copyright_dropped"] == 2 == 6 - len(kept)
    assert stats["dropped_copyright_risk"] == 2  # BaseFilter's per-reason counter
    assert stats["fired_domain"] == 1 and stats["dropped_with_domain"] == 1 and stats["domain_news"] == 1
    assert stats["fired_editorial"] == 2 and stats["dropped_with_editorial"] == 1
    assert stats["fired_boilerplate"] == 2 and stats.get("dropped_with_boilerplate", 0) == 0
    assert stats["fired_identifiers"] == 1 and stats["dropped_with_identifiers"] == 1
    assert stats["would_drop_at_0.3"] == 4 and stats["would_drop_at_0.4"] == 2


def test_url_key_is_configurable():
    doc = Document(text=prose(500), id="x", metadata={"source_url": "https://www.spiegel.de/a"})
    assert _run(CopyrightRiskFilter(url_key="source_url"), [doc]) == []
    doc = Document(text=prose(500), id="y", metadata={"source_url": "https://www.spiegel.de/a"})
    assert len(_run(CopyrightRiskFilter(), [doc])) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1.5}, "threshold must be a number in"),
    ({"threshold": "0.4"}, "threshold must be a number in"),
    ({"url_key": ""}, "url_key must be a non-empty string"),
])
def test_filter_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CopyrightRiskFilter(**kwargs)


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), ("dill", "dill")])
def test_filter_pickles_and_scores_the_same(dumps, loads):
    if dumps == "dill":  # what datatrove's SLURM executor uses (a datatrove dependency)
        import dill

        dumps, loads = dill.dumps, dill.loads
    step = CopyrightRiskFilter(threshold=0.3)
    clone = loads(dumps(step))
    assert type(clone).__module__ == "engmoe.data_prep.copyright.step"  # importable by the workers
    assert clone.threshold == 0.3 and clone.blocklist == step.blocklist
    docs_a, docs_b = _mixed_docs(), _mixed_docs()
    kept_a, kept_b = _run(step, docs_a), _run(clone, docs_b)
    assert [d.id for d in kept_a] == [d.id for d in kept_b] == ["clean", "footer"]
    assert [d.metadata["copyright_score"] for d in docs_a] == [d.metadata["copyright_score"] for d in docs_b]


def test_pipeline_with_local_executor_and_exclusion_writer(tmp_path):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    data = tmp_path / "data"
    data.mkdir()
    with (data / "part.jsonl").open("w") as f:
        for doc in _mixed_docs():
            f.write(json.dumps({"id": doc.id, "text": doc.text, **doc.metadata}) + "\n")
    executor = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(data)),
            CopyrightRiskFilter(threshold=0.4, exclusion_writer=JsonlWriter(str(tmp_path / "excluded"), compression=None)),
            JsonlWriter(str(tmp_path / "kept"), compression=None),
        ],
        logging_dir=str(tmp_path / "logs"),
        tasks=1,
        workers=1,
    )
    executor.run()

    def read(folder: str) -> dict[str, dict]:
        rows = [json.loads(line) for f in sorted((tmp_path / folder).glob("*.jsonl")) for line in f.open()]
        return {r["id"]: r for r in rows}

    excluded, kept = read("excluded"), read("kept")
    assert set(excluded) == {"news", "book"}
    assert set(kept) == {"clean", "footer", "three_chapters", "one_notice"}
    for row in excluded.values():
        assert row["metadata"]["filter_reason"] == "copyright_risk"
        assert row["metadata"]["copyright_score"] > 0.4
    assert all(0.0 <= row["metadata"]["copyright_score"] <= 0.4 for row in kept.values())

    report = filter_report(tmp_path / "logs")
    assert "| domain | 1 | 16.67 % | 1 | 100.00 % |" in report
    assert "Dropped at threshold 0.4: 2 / 6 = 33.33 %" in report
    assert "Would drop at 0.3: 4 / 6 = 66.67 %" in report
    assert report == filter_report(tmp_path / "logs" / "stats.json")
    assert report == filter_report(json.loads((tmp_path / "logs" / "stats" / "00000.json").read_text()))


# ------------------------------------------------------------------------------------------------ report
def _stats_after(threshold: float) -> dict:
    step = CopyrightRiskFilter(threshold=threshold)
    _run(step, _mixed_docs())
    return step.stats.to_dict()


def test_filter_report_table():
    step_stats = _stats_after(0.3)
    report = filter_report(step_stats)
    assert report.startswith("### ")
    assert "| signal | docs fired | % of all | dropped with it (> 0.3) | % of fired dropped |" in report
    assert "| editorial | 2 | 33.33 % | 2 | 100.00 % |" in report
    assert "| boilerplate | 2 | 33.33 % | 1 | 50.00 % |" in report
    assert "| identifiers | 1 | 16.67 % | 1 | 100.00 % |" in report
    assert "| **any (documents)** | 6 | 100.00 % | 4 | 66.67 % |" in report
    assert "Dropped at threshold 0.3: 4 / 6 = 66.67 %" in report
    assert "Would drop at 0.4: 2 / 6 = 33.33 %" in report
    assert "Blocklisted domains by category: news 1" in report
    assert filter_report(step_stats["stats"]).split("\n", 1)[1] == report.split("\n", 1)[1]


def test_filter_report_merges_unfinished_task_files(tmp_path):
    (tmp_path / "stats").mkdir()
    for rank in range(2):
        (tmp_path / "stats" / f"{rank:05d}.json").write_text(json.dumps([_stats_after(0.4)]))
    report = filter_report(tmp_path)  # no stats.json yet: the per-task files are summed
    assert "Dropped at threshold 0.4: 4 / 12 = 33.33 %" in report
    assert "| domain | 2 | 16.67 % | 2 | 100.00 % |" in report


@pytest.mark.parametrize("payload, message", [
    ([{"name": "reader", "stats": {"total": 3}}], "no copyright-filter step found"),
    ("not json", "not valid JSON"),
    ({"a": 1}, "expected datatrove stats"),
])
def test_filter_report_errors(tmp_path, payload, message):
    path = tmp_path / "stats.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        filter_report(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no stats.json and no stats/"):
        filter_report(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_copyright_score(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    with src.open("w") as f:
        for doc in _mixed_docs():
            record = {"content": doc.text, "id": doc.id}
            if doc.id == "news":  # datatrove-style nesting is understood too
                record["metadata"] = {"link": doc.metadata["url"]}
            elif "url" in doc.metadata:
                record["link"] = doc.metadata["url"]
            f.write(json.dumps(record) + "\n")
    out = tmp_path / "out" / "scored.jsonl"
    args = _parser().parse_args(["copyright-score", "--input", str(src), "--text-key", "content", "--url-key", "link",
                                 "--threshold", "0.4", "--out", str(out)])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert "Dropped at threshold 0.4: 2 / 6 = 33.33 %" in printed
    assert "Would drop at 0.3: 4 / 6 = 66.67 %" in printed
    assert "| domain | 1 | 16.67 % | 1 | 100.00 % |" in printed
    rows = [json.loads(line) for line in out.open()]
    assert [r["id"] for r in rows] == [d.id for d in _mixed_docs()]
    assert {r["id"] for r in rows if r["copyright_drop"]} == {"news", "book"}
    assert rows[4]["copyright_signals"] == ["domain"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["scored.jsonl"]  # no temp file left


@pytest.mark.parametrize("line, message", [
    ('{"text": 3}', "in.jsonl:2: field 'text' must be a string, got int"),
    ('{"body": "x"}', "in.jsonl:2: field 'text' must be a string, got nothing"),
    ("[1, 2]", "in.jsonl:2: expected a JSON object, got list"),
    ("{broken", "in.jsonl:2: not valid JSON"),
    ('{"text": "x", "url": 5}', "in.jsonl:2: field 'url' must be a string URL, got int"),
])
def test_cli_copyright_score_bad_input(tmp_path, capsys, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "fine"}\n' + line + "\n")
    out = tmp_path / "scored.jsonl"
    args = _parser().parse_args(["copyright-score", "--input", str(src), "--out", str(out)])
    assert args.fn(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing half-written


def test_cli_copyright_report(tmp_path, capsys):
    (tmp_path / "stats.json").write_text(json.dumps([{"name": "reader", "time_stats": {}, "stats": {}},
                                                     _stats_after(0.4)]))
    args = _parser().parse_args(["copyright-report", str(tmp_path)])
    assert args.fn(args) == 0
    assert "Dropped at threshold 0.4: 2 / 6 = 33.33 %" in capsys.readouterr().out
    args = _parser().parse_args(["copyright-report", str(tmp_path / "missing")])
    assert args.fn(args) == 2
    assert "missing: no such stats file or logging dir" in capsys.readouterr().err
