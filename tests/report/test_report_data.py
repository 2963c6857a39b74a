"""`engmoe report data`: datasets, licences, token counts per stage and filter statistics from manifests."""
import json

import yaml

from engmoe.report.data import collect_stage, to_markdown


def _blend(path, name, datasets):
    path.write_text(yaml.safe_dump({"name": name, "split": "1,0,0", "datasets": datasets}))
    return path


def test_data_report_from_manifests(demo_corpus, filtered_dataset, tmp_path):
    demo = demo_corpus.root
    web = filtered_dataset / "web-it" / "manifest.json"
    stage_a = _blend(tmp_path / "a.yaml", "stage-a", {
        "en": {"weight": 3, "manifest": str(demo / "tokens" / "en_train" / "manifest.json")},
        "web-it": {"weight": 1, "manifest": str(web)},
        "unused": {"weight": 0, "manifest": "nowhere/manifest.json"},
    })
    stage_b = _blend(tmp_path / "b.yaml", "stage-b", {
        "it": {"weight": 1, "manifest": str(demo / "tokens" / "it_train" / "manifest.json")},
        "gone": {"weight": 1, "manifest": "missing-dataset/manifest.json"},
    })
    stages = [collect_stage(stage_a, tmp_path, budget=1e6), collect_stage(stage_b, tmp_path)]
    en_manifest = json.loads((demo / "tokens" / "en_train" / "manifest.json").read_text())
    web_manifest = json.loads(web.read_text())
    rows = {r.name: r for r in stages[0].rows}
    assert rows["en"].tokens == en_manifest["tokens"] and rows["en"].license == "CC-BY-SA-4.0"
    assert rows["web-it"].tokens == web_manifest["tokens"] and rows["web-it"].documents == 3
    assert rows["en"].weight == 0.75 and rows["unused"].status == "unused (weight 0)"
    assert {r.name: r.status for r in stages[1].rows}["gone"] == "MISSING"

    md = to_markdown(stages)
    lines = md.splitlines()
    en_line = next(line for line in lines if line.startswith("| en |"))
    assert "75.0 %" in en_line and "CC-BY-SA-4.0" in en_line and "750.00k" in en_line  # 0.75 · 1e6 drawn
    assert f"{750_000 / en_manifest['tokens']:.2f}" in en_line  # epochs
    assert next(line for line in lines if line.startswith("| gone |")).endswith("MISSING |")
    # licence table over both stages
    assert any(line.startswith("| BSD-3-Clause | it | stage-b |") for line in lines)
    assert any(line.startswith("| ODC-By-1.0 | web-it | stage-a |") for line in lines)
    # the copyright filter's statistics, threshold from the manifest's filter settings
    assert "#### web-it:" in md and "Dropped at threshold 0.3: 1 / 4 = 25.00 %" in md
    assert "| editorial | 1 | 25.00 % | 1 | 100.00 % |" in md


def test_cli_report_data(demo_corpus, tmp_path, capsys):
    from engmoe.cli import main

    out = tmp_path / "data.md"
    blends = [str(demo_corpus.root / "blend_train.yaml"), str(demo_corpus.root / "blend_valid.yaml")]
    assert main(["report", "data", *blends,
                 "--data-root", str(demo_corpus.root), "--stage-tokens", "2e6", "1e5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### Stage demo-train" in printed and "### Stage demo-valid" in printed
    assert "No filter statistics recorded" in printed
    assert out.read_text() == printed
