"""bench/layers.py end to end on a tiny Llama: the candidates' curvature into a store (then read
back from it), every candidate scored, and bench/results/layers.md's table and choices, each
choice a `layers` spec the model takes."""

from __future__ import annotations

import re

from conftest import load_bench_script

from crispedit.models import load_model, parse_layers

layers = load_bench_script("layers")


def test_the_bench_scores_every_candidate_and_writes_choices_the_model_takes(
    tmp_path, tiny_model_dir, capsys
):
    out = tmp_path / "layers.md"
    argv = ["--model", str(tiny_model_dir), "--store", str(tmp_path / "store"),
            "--tokens", "400", "--n", "6", "--ks", "2,3", "--compare", "2-3 0,3 20-24",
            "--out", str(out)]  # fmt: skip
    layers.main(argv)
    first = out.read_text()
    assert "collected in" in capsys.readouterr().err
    model, _ = load_model(str(tiny_model_dir))
    table = [line for line in first.splitlines() if re.match(r"\| \d \| model\.layers", line)]
    assert [line.split(" | ")[1] for line in table] == parse_layers(model, "0-3")
    ranks = sorted(int(line.rstrip(" |").rsplit("| ", 1)[1]) for line in table)
    assert ranks == [1, 2, 3, 4]
    choices = dict(re.findall(r"\| (top \d by (?:kept )?score) \| ([\d,-]+) \|", first))
    assert set(choices) == {"top 2 by score", "top 3 by score", "top 2 by kept score",
                            "top 3 by kept score"}  # fmt: skip
    for k, spec in ((2, choices["top 2 by score"]), (3, choices["top 3 by score"])):
        assert len(parse_layers(model, spec)) == k
    assert "| compared | 2-3 | " in first and "| 1.00× |" in first  # against itself
    assert "| compared | 20-24 | - | - | - |" in first  # blocks the tiny model lacks
    # again: the curvature comes from the store, and the figures are the same
    layers.main(argv)
    assert "from the store (collected in" in capsys.readouterr().err
    strip = lambda text: re.sub(r"Curvature:.*?\n|Gradients and scores: \d+ s", "", text)  # noqa: E731
    assert strip(out.read_text()) == strip(first)
