"""Copyright-risk filter: a per-document score from four signals, as in the EngGPT2 report.

The report drops pretraining documents whose copyright-risk score exceeds a threshold (0.3 drops about
18.8 % of its corpus, 0.4 about 5.9 %). The package holds one job per module:

* :mod:`.blocklist`: the domain blocklist (``resources/copyright_domains.txt``), its loading and validation,
  and URL-host matching;
* :mod:`.signals`: the pure scorer (:func:`~.signals.score_document`), its four detectors and data types,
  usable without a pipeline;
* :mod:`.step`: :class:`~.step.CopyrightRiskFilter`, the datatrove step that stores the score on every
  document, drops the risky ones with a reason the exclusion writer records, and counts per-signal stats
  (tallied by :class:`~.step.SignalTally`);
* :mod:`.report`: :func:`~.report.filter_report`, which turns the stats a finished pipeline saved into the
  report's table;
* :mod:`.cli`: :func:`~.cli.register`, the ``engmoe-data copyright-score`` / ``copyright-report``
  subcommands.

Import each name from the module that defines it (e.g. ``engmoe.data_prep.copyright.step.CopyrightRiskFilter``).

Scoring (documented once here; the constants in :mod:`.signals` are the knobs)
--------------------------------------------------------------------------------
Each signal yields a sub-score ``s`` in ``[0, weight]``; the document score is their noisy-OR
``1 - prod(1 - s)``: independent evidence accumulates, the result stays in [0, 1], and no single weak
signal can reach a threshold that only combined evidence should reach.

* ``domain``: the URL's host is (a subdomain of) a blocklisted domain -> ``s = DOMAIN_WEIGHT`` (0.6), so a
  blocklisted page is dropped at both 0.3 and 0.4 on its own.
* ``editorial``: book structure: chapter/volume headings, front-matter headings (preface, table of
  contents, ...), table-of-contents leader lines (``Intro ....... 3``) and runs of page numbers (each run
  counts ``PAGE_RUN_MARKERS``). ``s = 0.5 * (1 - exp(-n / 3))``: one heading 0.14, three 0.32, ten 0.48. Not
  length-normalised: a book keeps its chapters however long the excerpt.
* ``boilerplate``: weak marks (©, ®, ™, "copyright 2020", "All rights reserved" in it/en/fr/de/es/pt) are
  footer material that every commercial page carries, so they are normalised per ``BOILERPLATE_CHARS``
  (2000) characters; publication/licence notices ("No part of this publication may be reproduced",
  "Riproduzione riservata", "Achevé d'imprimer", "Nachdruck verboten", "Depósito legal", ...) are book or
  news-agency material and count ``NOTICE_POINTS`` (3) each, unnormalised.
  ``s = 0.5 * (1 - exp(-points / 3))``: a lone © on a 10k-character page 0.03, a short page's
  "© 2020 X. All rights reserved." 0.24, one notice 0.32.
* ``identifiers``: distinct valid ISBN-10/13 (check digit verified) count 1 each; distinct DOIs count per
  ``DOI_CHARS`` (5000) characters because reference lists grow with article length.
  ``s = 0.35 * (1 - exp(-points / 2))``: identifiers alone never pass 0.4 (Wikipedia-style citation lists
  stay in), but they tip editorial evidence over it (4 headings + 1 ISBN = 0.46).

Scores are rounded to 6 decimals so "exactly at the threshold" is well defined; documents are dropped only
when ``score > threshold``.
"""
