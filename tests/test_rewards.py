"""Reward tasks on a tiny random decoder: a reward of greedy completions that evolution
strategies raise, the user's reward function and its failures, the built-in tasks."""

import json

import pytest

from zoptim.cli import main
from zoptim.runs import config
from zoptim.runs.config import ConfigError
from zoptim.runs.run import audit, build, step_loss
from zoptim.tasks.data import load_task

# The tiny random decoder writes ':' over and over; this reward asks it not to.
REWARD_MODULE = '''
def colons(prompt, completion, example):
    return -completion.count(":") / max(len(completion), 1)

def consistent(prompt, completion, example):
    a, b = (int(w.rstrip("?")) for w in prompt.split() if w.rstrip("?").isdigit())
    return float(example["id"] == 4 * a + b)

def raises(prompt, completion, example):
    raise KeyError("score")

def text(prompt, completion, example):
    return "high"
'''


@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    """A working directory with the user's reward module and a prompts file."""
    (tmp_path / "myreward.py").write_text(REWARD_MODULE)
    prompts = [{"prompt": f"Q: what is {a} plus {b}?\nA:", "id": 4 * a + b}
               for a in range(4) for b in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def settings(tiny, reward="myreward:colons", method="es",
             method_settings="{lr = 0.1, eps = 0.1, members = 8}"):
    pairs = [f"model.name={json.dumps(str(tiny))}", "task.kind=\"reward\"", "task.name=\"file\"",
             "task.path=\"prompts.jsonl\"", f"task.reward=\"{reward}\"", "task.train=8",
             "task.dev=4", "task.test=4", "batch_size=8", "eval_batch_size=8",
             "task.max_new_tokens=4", "model.max_length=48", f"method.name=\"{method}\"",
             f"method.settings={method_settings}"]
    return [a for p in pairs for a in ("--set", p)]


@pytest.mark.parametrize("per_prompt", ["false", "true"])
def test_es_raises_a_reward_of_greedy_completions_and_resumes_bit_for_bit(tiny, reward_dir,
                                                                         per_prompt):
    """20 steps of 8 members on 8 prompts lift the reward from -1 (every character a colon) to
    above -0.5 (0.0 measured), with rewards normalized per prompt or not."""
    out = reward_dir / "run"
    method_settings = f"{{lr = 0.1, eps = 0.1, members = 8, per_prompt = {per_prompt}}}"
    line = ["train", "--out", str(out), "--no-progress",
            *settings(tiny, method_settings=method_settings), "--set", "eval_every=5",
            "--set", "save_every=5"]
    assert main(line + ["--set", "steps=10"]) == 0
    assert main(line + ["--resume", "--set", "steps=20"]) == 0
    found = audit(out)
    assert (found.steps, found.equal, found.problems) == (20, True, [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "reward"
    train_run = build(config.load(None, [a for a in settings(tiny) if a != "--set"]))
    before = train_run.clf.score(train_run.splits.train, 8)
    assert before == -1.0
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 20 and records[-1]["reward"] > -0.5
    assert {"reward_spread", "generations_per_s"} <= set(records[0])
    assert max(r["reward_spread"] for r in records) > 0


def test_eggroll_raises_the_reward_with_its_population_in_one_stacked_batch(tiny, reward_dir):
    """10 steps of 8 rank-4 members, evaluated as slices of one batch, lift the reward of the
    unperturbed model from -1 (every character a colon) to above -0.5 (0.0 measured)."""
    out = reward_dir / "run"
    line = ["train", "--out", str(out), "--no-progress", "--set", "steps=10",
            *settings(tiny, method="eggroll",
                      method_settings="{lr = 0.1, eps = 0.03, members = 8, rank = 4}")]
    assert main(line) == 0
    run = build(config.load(None, [a for a in settings(tiny, method="eggroll")
                                   if a != "--set"]))
    assert run.opt.batched is not None  # the population shares one stacked batch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["dev_acc"] == -1.0 and summary["after"]["dev_acc"] > -0.5
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["reward_spread"] for r in records) > 0


@pytest.mark.parametrize("method, method_settings", [
    ("zo-muon", "lr = 1e-2, eps = 1.0, rank = 4"),
    ("eggroll", "lr = 1e-2, eps = 0.02, rank = 4, members = 8"),
    ("eggroll", "lr = 1e-2, eps = 0.02, rank = 4, members = 8, per_prompt = true")])
def test_batched_queries_give_the_in_place_rewards(tiny, reward_dir, method, method_settings):
    values = {}
    for batched in ("false", "true"):
        cfg = config.load(None, [a for a in settings(
            tiny, method=method,
            method_settings=f"{{{method_settings}, batched = {batched}}}")
            if a != "--set"])
        run = build(cfg)
        examples = run.splits.train
        run.opt.step(step_loss(run, examples))
        values[batched] = run.opt.last_values
    assert values["true"] == values["false"] and len(set(values["true"])) > 1


@pytest.mark.parametrize("reward, message", [
    ("myreward:raises", "the reward raised KeyError"),
    ("myreward:text", "returned 'high', not a finite number"),
    ("myreward:missing", "has no function 'missing'"),
    ("nomodule:fn", "cannot import 'nomodule'"),
    ("colons", "name a built-in reward")])
def test_a_reward_that_fails_stops_the_run_with_its_reason(tiny, reward_dir, capsys, reward,
                                                           message):
    out = reward_dir / "run"
    code = main(["train", "--out", str(out), "--no-progress", *settings(tiny, reward),
                 "--set", "steps=2"])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    (["task.reward=\"conciseness\""], "task.reward scores the completions"),
    (["task.kind=\"reward\"", "task.name=\"file\""], "needs task.reward"),
    (["task.name=\"countdown\"", "task.kind=\"generation\""], "is a reward task"),
    (["task.name=\"countdown\"", "task.demonstrations=2"], "no solutions to show"),
    (["task.name=\"countdown\"", "method.name=\"adamw\"", "method.settings={}"],
     "follows a gradient"),
    (["method.name=\"es\"", "method.settings={per_prompt = true}"], "needs a reward task"),
    (["task.name=\"squad\"", "task.objective=\"f1\"", "method.name=\"forward-gradient\"",
      "method.settings={}"], "follows a gradient")])
def test_reward_task_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_a_reward_task_leaves_the_loss_jump_test_off_unless_asked():
    countdown = config.load(None, ["task.name=\"countdown\""])
    assert (countdown.task.kind, countdown.task.reward, countdown.guard.spike) == \
        ("reward", "countdown", 0.0)
    asked = config.load(None, ["task.name=\"countdown\"", "guard.spike=5.0"])
    assert asked.guard.spike == 5.0 and config.load(None, []).guard.spike == 10.0


def test_rows_a_built_in_reward_cannot_score_are_refused_before_the_model(tiny, reward_dir,
                                                                       capsys):
    code = main(["train", "--out", str(reward_dir / "run"), "--no-progress",
                 *settings(tiny, "countdown"), "--set", "steps=1"])
    assert code == 2
    assert "the countdown reward needs 'numbers'" in capsys.readouterr().err
    assert not (reward_dir / "run" / "checkpoint-0").exists()


def test_countdown_splits_are_generated_from_the_task_seed():
    a = load_task("countdown", train=20, dev=5, test=5, seed=7, kind="reward")
    b = load_task("countdown", train=20, dev=5, test=5, seed=7, kind="reward")
    assert a.train == b.train and len(a.dev) == 5 and a.labels == []
    row = a.train[0].row
    assert sorted(row) == ["numbers", "solution", "target"]
    assert a.train[0].prompt.endswith("<think>")


def test_a_countdown_run_scores_its_generated_puzzles(tiny, tmp_path):
    out = tmp_path / "run"
    line = ["train", "--out", str(out), "--no-progress"]
    for s in [f"model.name={json.dumps(str(tiny))}", "task.name=\"countdown\"", "task.train=4",
              "task.dev=2", "task.test=2", "batch_size=2", "task.max_new_tokens=4",
              "model.max_length=128", "method.name=\"es\"", "method.settings={members = 2}",
              "steps=1"]:
        line += ["--set", s]
    assert main(line) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "reward" and summary["after"]["test_acc"] == 0.0
    assert json.loads((out / "split.json").read_text())["sizes"] == [4, 2, 2]


def test_grpo_trains_through_trl_on_the_same_prompts_and_reward(tiny, reward_dir):
    """The first-order baseline: TRL's GRPOTrainer on the run's model, its prompts and its
    reward (each completion scored with its own prompt's row), writing a zoptim run's
    records with generations counted."""
    pytest.importorskip("trl")
    out = reward_dir / "run"
    line = ["train", "--out", str(out), "--no-progress", "--set", "steps=3", "--set",
            "eval_every=2", *settings(tiny, reward="myreward:consistent", method="grpo",
                      method_settings="{lr = 1e-4, generations = 4}")]
    assert main(line) == 0
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generations"] for r in records] == [32, 64, 96]  # 8 prompts x 4 a step
    assert all(r["reward"] == 1.0 for r in records)  # every completion met its own row
    assert [("dev_acc" in r) for r in records] == [False, True, True]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["generations"] == 96 and summary["before"]["dev_acc"] == 1.0
    # its folder keeps a run folder's rules: a finished run is not run again without
    # --resume, and a folder of someone else's files is refused as it is
    assert main(line) == 2
    mine = reward_dir / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    assert main([*line[:2], str(mine), *line[3:]]) == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="needs a reward task"):
        config.load(None, ["method.name=\"grpo\"", "method.settings={}"])
    with pytest.raises(ConfigError, match="does not divide a step's 24 completions"):
        config.load(None, ["task.name=\"countdown\"", "method.name=\"grpo\"", "batch_size=3",
                           "method.settings={generations = 8, micro_batches = 5}"])
    with pytest.raises(ConfigError, match="at least 2 completions"):
        config.load(None, ["task.name=\"countdown\"", "method.name=\"grpo\"",
                           "method.settings={generations = 1}"])


def test_grpos_memory_counts_adamw_state_gradients_and_the_backward(tiny, reward_dir):
    from zoptim.bench.memory import grpo_step
    from zoptim.runs.run import batch

    run = build(config.load(None, [a for a in settings(tiny, method="grpo",
                                                       method_settings="{generations = 2}")
                                   if a != "--set"]))
    row = grpo_step(run, batch(run, 0))
    params = sum(p.numel() * 4 for p in run.clf.parameters())
    tensors = len(list(run.clf.parameters()))
    # two moments and a gradient per parameter, and AdamW's step counters
    assert row["params"] == params and 3 * params <= row["state"] <= 3 * params + 8 * tensors
    assert row["transient"] > 0
    assert row["total"] == row["params"] + row["state"] + row["transient"]


def test_a_reward_benchmark_sets_es_eggroll_and_grpo_side_by_side_in_generations(tiny,
                                                                                 reward_dir):
    from zoptim.bench.matrix import run as bench

    (reward_dir / "bench.toml").write_text(f"""
seeds = [0]
baseline = "es"
[base]
steps = 2
eval_every = 1
batch_size = 4
eval_batch_size = 8
model = {{ name = {json.dumps(str(tiny))}, max_length = 48 }}
[base.task]
kind = "reward"
name = "file"
path = "prompts.jsonl"
reward = "myreward:colons"
train = 8
dev = 4
test = 4
max_new_tokens = 4
[[methods]]
label = "es"
name = "es"
settings = {{ lr = 0.1, eps = 0.1, members = 4 }}
[[methods]]
label = "eggroll"
name = "eggroll"
settings = {{ lr = 0.1, eps = 0.03, members = 4, rank = 4 }}
[[methods]]
label = "grpo"
name = "grpo"
steps = 1
settings = {{ lr = 1e-4, generations = 4 }}
""")
    results = bench(str(reward_dir / "bench.toml"), reward_dir / "out", log=lambda *_: None)
    assert results["cost"] == "generations"
    spent = {label: m["generations"]["median"] for label, m in results["methods"].items()}
    assert spent == {"es": 32, "eggroll": 32, "grpo": 16}  # 2 x 4 members x 4, 1 x 4 x 4
    assert results["methods"]["grpo"]["memory"]["state"] > 0  # AdamW's
    report = (reward_dir / "out" / "report.md").read_text()
    assert "generations to target / es" in report and "mean greedy reward" in report
    assert (reward_dir / "out" / "reward_vs_generations.png").exists()
    assert (reward_dir / "out" / "reward_vs_seconds.png").exists()
