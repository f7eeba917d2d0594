"""``zoptim eval`` writes what the model predicts, example by example, beside its score."""

import json

import pytest

from zoptim.cli import main

from test_bad_inputs import train_args
from test_kinds import MC, QA, run_settings, write_jsonl


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_classifier_s_predictions_are_its_highest_label_and_make_its_score(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out)]) == 0
    records = lines(out / "predictions.jsonl")
    assert len(records) == 8 and {r["split"] for r in records} == {"test"}
    for r in records:
        assert set(r["scores"]) == {r["gold"], *r["scores"]} and len(r["scores"]) == 2
        assert r["prediction"] == max(r["scores"], key=r["scores"].get)
        assert r["correct"] == (r["prediction"] == r["gold"]) and r["input"]
    score = sum(r["correct"] for r in records) / len(records)
    # the score the run reported at its end, computed anew from the lines
    assert score == summary["after"]["test_acc"]
    assert json.loads((out / "eval.json").read_text())["score"] == score
    assert "predictions.jsonl" in capsys.readouterr().out
    assert main(["eval", str(out), "--split", "dev"]) == 0
    assert len(lines(out / "predictions.jsonl")) == 8 and \
        lines(out / "predictions.jsonl")[0]["split"] == "dev"


@pytest.mark.parametrize("kind, rows", [("generation", QA), ("multiple_choice", MC)])
def test_a_decoder_s_predictions_show_its_answers_and_options(tiny, tmp_path, kind, rows):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress",
                 *run_settings(tiny, data, kind, "task.max_new_tokens=4", "steps=1",
                               'method.name="mezo"')]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert main(["eval", str(out)]) == 0
    records = lines(out / "predictions.jsonl")
    assert len(records) == 4
    if kind == "generation":
        for r in records:
            assert r["input"].startswith("Q: what is") and r["answers"]
            assert isinstance(r["prediction"], str) and isinstance(r["ended"], bool)
        score = sum(r["score"] for r in records) / 4
    else:
        for r in records:
            assert len(r["options"]) == len(r["scores"]) == 3
            assert r["prediction"] == max(range(3), key=r["scores"].__getitem__)
        score = sum(r["correct"] for r in records) / 4
    assert score == pytest.approx(summary["after"]["test_acc"], abs=1e-12)


def test_generate_answers_a_prompt_from_a_trained_decoder_run(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", QA)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress",
                 *run_settings(tiny, data, "generation", "task.max_new_tokens=4", "steps=1",
                               'method.name="mezo"')]) == 0
    capsys.readouterr()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Q: what is 1 plus 2?\nA:\n\nQ: what is 3 plus 0?\n")
    assert main(["generate", str(out), "--prompt", "Q: what is 2 plus 2?", "--prompts",
                 str(prompts), "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if line.startswith("> ")] == \
        ["> Q: what is 2 plus 2?", "> Q: what is 1 plus 2?", "> A:", "> Q: what is 3 plus 0?"]
    assert len(printed) == 8
    assert main(["generate", str(out), "--prompt", "hi", "--max-new-tokens", "0"]) == 2


def test_generate_refuses_a_run_that_is_not_a_decoder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out)) == 0
    assert main(["generate", str(out), "--prompt", "a fine film"]) == 2
    assert "not a decoder" in capsys.readouterr().err


def test_a_run_reports_to_tensorboard_and_plots_its_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(train_args(out, 'report_to=["tensorboard"]', "eval_every=1")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "dev_acc", "queries"):
        assert [e.value for e in events.Scalars(key)] == \
            pytest.approx([m[key] for m in metrics])
    assert [e.step for e in events.Scalars("loss")] == [m["step"] + 1 for m in metrics]
    assert (out / "curves.png").stat().st_size > 0


def test_a_destination_whose_package_is_missing_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find(name, *a))
    assert main(train_args(tmp_path / "run", 'report_to=["wandb"]')) == 2
    assert "pip install wandb" in capsys.readouterr().err and not (tmp_path / "run").exists()



CHAT = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": str(a + b)}]}
        for a in range(4) for b in range(4)]


def test_a_chat_run_s_predictions_and_generations_keep_its_messages(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", CHAT)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress",
                 *run_settings(tiny, data, "generation", "task.max_new_tokens=3", "steps=1",
                               'method.name="mezo"')]) == 0
    assert main(["eval", str(out)]) == 0
    for r in lines(out / "predictions.jsonl"):
        assert r["input"][0]["role"] == "user" and r["input"][0]["content"].startswith("What is")
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "What is 2 plus 2?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
