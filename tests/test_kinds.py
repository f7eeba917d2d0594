"""Task kinds on a decoder: multiple choice and generation (SFT), their losses against hand
computations, greedy decoding, exact match and F1, users' files, and whole runs."""

import copy
import json

import pytest
import torch

import zoptim
from methods import eggroll_pairs
from zoptim.cli import main
from zoptim.integrations.choices import ChoiceObjective
from zoptim.integrations.completions import CompletionObjective
from zoptim.runs import config
from zoptim.runs.run import audit, build, step_loss
from zoptim.tasks.data import DataError, Example
from zoptim.tasks.kinds import Choice, Completion, load_kind_file
from zoptim.tasks.metrics import best_score, exact_match, normalize_answer, token_f1


@pytest.fixture(scope="module")
def model_tok(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)


def nll_alone(model, context_ids, answer_ids):
    """The hand computation: one unpadded row, every position's logits, the answer's tokens'
    negative log-likelihoods."""
    ids = torch.tensor([context_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(context_ids)
    return -sum(float(logp[n - 1 + k, t]) for k, t in enumerate(answer_ids))


# -- metrics -------------------------------------------------------------------------------

def test_squad_normalization_exact_match_and_f1():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("an apple.", "Apple") == 1.0
    assert exact_match("apples", "apple") == 0.0
    # 2 shared words of 3 predicted and 4 expected: P = 2/3, R = 1/2, F1 = 4/7
    assert token_f1("red big house", "the big red old barn") == pytest.approx(4 / 7)
    assert token_f1("a", "the") == 1.0  # both empty after normalization
    assert token_f1("", "Paris") == 0.0
    assert best_score("f1", "Paris", ["London", "paris."]) == 1.0


# -- users' files ---------------------------------------------------------------------------

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_files_of_each_kind_are_read_and_every_bad_row_is_named(tmp_path):
    pool, labels = load_kind_file("generation", str(write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "Q: 2+2?\nA:", "completion": " 4", "answers": ["4", "four"]},
        {"messages": [{"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris"}]}])))
    assert labels == [] and pool[0] == Completion("Q: 2+2?\nA:", " 4", ("4", "four"))
    assert pool[1].chat and pool[1].answers == ("Paris",)
    pool, _ = load_kind_file("multiple_choice", str(write_jsonl(tmp_path / "m.jsonl", [
        {"context": "The sky is", "options": ["blue", "green", "loud"], "answer": "blue"}])))
    assert pool == [Choice("The sky is", ("blue", "green", "loud"), 0)]
    bad = {
        "generation": [({"prompt": "Q?"}, "'completion'"),
                       ({"prompt": "Q?", "completion": "x", "answer": " "}, "'answer'"),
                       ({"messages": [{"role": "robot", "content": "hi"},
                                      {"role": "assistant", "content": "x"}]}, "role"),
                       ({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "user", "content": "x"}]}, "assistant"),
                       ("[1, 2]", "object")],
        "multiple_choice": [({"context": "c", "options": ["a"], "answer": 0}, "at least two"),
                            ({"context": "c", "options": ["a", "b"], "answer": 2}, "'answer'"),
                            ({"context": "c", "options": ["a", "b"], "answer": True},
                             "'answer'")]}
    for kind, cases in bad.items():
        for row, culprit in cases:
            path = write_jsonl(tmp_path / "bad.jsonl", [row])
            with pytest.raises(DataError, match=f"bad.jsonl:1: .*{culprit}"):
                load_kind_file(kind, str(path))


# -- objectives against hand computations ----------------------------------------------------

def test_the_generation_loss_is_the_answer_tokens_nll_alone(model_tok):
    model, tok = model_tok
    obj = CompletionObjective(model, tok, max_length=64)
    examples = [Completion("Q: the capital of France?\nA:", " Paris", ("Paris",)),
                Completion("Say hi.", " Hello there, friend", ("Hello",)),
                Completion((("user", "Name a colour."),), "Blue", ("Blue",))]
    hand = [nll_alone(model, obj.context_ids(e), obj.answer_ids(e)) / len(obj.answer_ids(e))
            for e in examples]
    assert obj.answer_ids(examples[0])[-1] == tok.eos_token_id
    assert tok.decode(obj.context_ids(examples[2])).endswith("assistant\n")
    with torch.no_grad():
        assert float(obj.loss(examples)) == pytest.approx(sum(hand) / 3, rel=1e-4)
        stacked = obj.loss(examples, slices=3)
    assert stacked.shape == (3,) and torch.allclose(stacked, stacked[0].expand(3))
    assert float(stacked[0]) == pytest.approx(sum(hand) / 3, rel=1e-4)


def test_multiple_choice_scores_are_summed_log_probabilities(model_tok):
    model, tok = model_tok
    obj = ChoiceObjective(model, tok, max_length=64)
    examples = [Choice("The cat sat on the", ("mat", "moon", "idea"), 0),
                Choice("Water is", ("wet", "a dry powder"), 1)]  # different option counts
    with torch.no_grad():
        scores = obj.option_scores(examples)[0]
    for i, e in enumerate(examples):
        for j, option in enumerate(e.options):
            ctx = tok(e.context).input_ids
            cont = tok(" " + option, add_special_tokens=False).input_ids
            assert float(scores[i, j]) == pytest.approx(-nll_alone(model, ctx, cont), rel=1e-4)
    assert scores[1, 2] == float("-inf")
    hand = -torch.log_softmax(scores[0], -1)[0] - torch.log_softmax(scores[1, :2], -1)[1]
    with torch.no_grad():
        assert float(obj.loss(examples)) == pytest.approx(float(hand) / 2, rel=1e-4)
    assert obj.score(examples) == sum(int(scores[i].argmax() == e.label)
                                      for i, e in enumerate(examples)) / 2


def test_greedy_decoding_in_batches_with_the_cache_equals_a_plain_loop(model_tok):
    model, tok = model_tok
    obj = CompletionObjective(model, tok, max_length=64, max_new_tokens=6)
    examples = [Completion("Once upon a time", " x", ("x",)),
                Completion("A much longer prompt, so the batch is padded on the left:", " y",
                           ("y",))]
    batched = obj.generate(examples, batch_size=2)
    for e, (text, _) in zip(examples, batched):
        ids = obj.context_ids(e)
        new = []
        with torch.no_grad():
            for _ in range(6):  # no cache, no padding: the whole row every token
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()


# -- whole runs -------------------------------------------------------------------------------

def run_settings(tiny, path, kind, *extra):
    return ["--set", f"model.name={json.dumps(str(tiny))}", "--set", f"task.kind=\"{kind}\"",
            "--set", "task.name=\"file\"", "--set", f"task.path={json.dumps(str(path))}",
            "--set", "task.train=8", "--set", "task.dev=4", "--set", "task.test=4",
            "--set", "batch_size=4", "--set", "eval_batch_size=4", "--set", "model.max_length=48",
            "--set", "eval_every=100", *[a for s in extra for a in ("--set", s)]]


QA = [{"prompt": f"Q: what is {a} plus {b}?\nA:", "completion": f" {a + b}"}
      for a in range(4) for b in range(4)]
MC = [{"context": f"{a} plus {b} is", "options": [str(a + b), str(a + b + 1), "no"],
       "answer": 0} for a in range(4) for b in range(4)]
# 2 to 4 options an example: GRZO pads each example's rows to its batch's most
MC_UNEVEN = [{"context": f"{a} plus {b} is",
              "options": [str(a + b), str(a + b + 1), "no", "many"][:2 + (a + b) % 3],
              "answer": (a + b) % 2} for a in range(4) for b in range(4)]


ZO_MUON = ("zo-muon", "{lr = 1e-3, eps = 1e-3, rank = 4}")


@pytest.mark.parametrize("kind, rows, method", [
    ("generation", QA, ZO_MUON), ("multiple_choice", MC, ZO_MUON),
    ("generation", QA, ("grzo", "{lr = 1e-4, eps = 1e-3}")),
    ("multiple_choice", MC_UNEVEN, ("grzo", "{lr = 1e-4, eps = 1e-3}"))])
def test_a_run_of_each_kind_resumes_and_replays_bit_for_bit(tiny, tmp_path, kind, rows, method):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    settings = run_settings(tiny, data, kind, "task.max_new_tokens=4", "save_every=2",
                            f"method.name=\"{method[0]}\"", f"method.settings={method[1]}")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *settings, "--set", "steps=2"]) == 0
    assert main(["train", "--out", str(out), "--no-progress", "--resume", *settings,
                 "--set", "steps=4"]) == 0
    found = audit(out)
    assert (found.steps, found.compared, found.equal, found.problems) == \
        (4, "checkpoint-4", True, [])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == ("f1" if kind == "generation" else "accuracy")
    assert 0 <= summary["after"]["test_acc"] <= 1


def build_run(tiny, data, kind, *sets):
    return build(config.load(None, [s for s in run_settings(tiny, data, kind, *sets)
                                    if s != "--set"]))


@pytest.mark.parametrize("kind, rows, method, settings", [
    ("generation", QA, "mezo", "{lr = 1e-3, eps = 1e-3}"),
    ("multiple_choice", MC, "zo-muon", "{lr = 2e-2, eps = 1e-3, rank = 4}")])
def test_zeroth_order_steps_lower_the_training_loss_of_each_kind(tiny, tmp_path, kind, rows,
                                                                   method, settings):
    """60 steps on the 8 training examples of the tiny random decoder lower their loss by
    more than 0.05 (about 0.5 and 0.45 measured)."""
    run = build_run(tiny, write_jsonl(tmp_path / "data.jsonl", rows), kind,
                    f"method.name=\"{method}\"", f"method.settings={settings}")
    examples = run.splits.train
    with torch.no_grad():
        before = float(run.clf.loss(examples))
    for _ in range(60):
        run.opt.step(step_loss(run, examples))
    with torch.no_grad():
        assert float(run.clf.loss(examples)) < before - 0.05


SFT_EXAMPLES = [Completion("Q: the capital of France?\nA:", " Paris", ("Paris",)),
                Completion("Say hi.", " Hello there, friend", ("Hello",)),
                Completion((("user", "Name a colour."),), "Blue", ("Blue",)),
                Completion("2 plus 2 is", " 4", ("4",))]
# options of different numbers and lengths: under per-example points each example's rows are
# padded to the batch's most options
CHOICE_EXAMPLES = [Choice("The sky is", ("blue", "green"), 0),
                   Choice("2 plus 2 is", ("4", "5", "twenty-two"), 0),
                   Choice("Paris is in", ("France", "Spain", "Peru", "the middle of the sea"), 0),
                   Choice("Cats say", ("woof", " meow"), 1)]


def grzo_objective(tiny, kind):
    """A fresh tiny decoder under the objective of ``kind``, with its examples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    if kind == "sft":
        return CompletionObjective(model, tok, max_length=48), SFT_EXAMPLES
    normalized = kind == "multiple_choice_normalized"
    return ChoiceObjective(model, tok, max_length=48, length_normalized=normalized), \
        CHOICE_EXAMPLES


@pytest.mark.parametrize("kind", ["sft", "multiple_choice", "multiple_choice_normalized"])
def test_grzo_evaluates_each_example_at_its_own_direction(tiny, kind):
    """GRZO on teacher-forced completions and on multiple choice: one pass of the batch gives
    every example its loss at its own direction, as EGGROLL's antithetic pairs (same seed,
    same spaces) give them one example at a time in place, on the tiny decoder (its embedding
    tied to the output layer, its RMS norms run again per row, its rows padded to different
    lengths, a multiple-choice example's options to the batch's most)."""
    obj, examples = grzo_objective(tiny, kind)
    model = obj.backbone
    start = copy.deepcopy(model.state_dict())
    opt = zoptim.GRZO(obj.parameters(), model=obj, examples=4, lr=1e-3, eps=1e-2, seed=3)
    opt.step(lambda slices=None: obj.loss(examples, slices))
    model.load_state_dict(start)
    ref_plus, ref_minus = map(torch.tensor, eggroll_pairs(
        obj.parameters(), lambda b: obj.loss(examples[b:b + 1]), 4, lr=1e-3, eps=1e-2, seed=3))
    plus, minus = torch.tensor(opt.last_values[:4]), torch.tensor(opt.last_values[4:])
    torch.testing.assert_close(plus, ref_plus, rtol=1e-5, atol=0)
    torch.testing.assert_close(minus, ref_minus, rtol=1e-5, atol=0)
    # the differences, what the step uses, are far above that tolerance: a direction given to
    # the wrong example would show
    assert (plus - minus).abs().min() > 1e-3
    torch.testing.assert_close(plus - minus, ref_plus - ref_minus, rtol=1e-2, atol=1e-4)


def test_grzo_refuses_multiple_choice_batches_of_another_size(tiny):
    obj, examples = grzo_objective(tiny, "multiple_choice")
    opt = zoptim.GRZO(obj.parameters(), model=obj, examples=3, seed=3)
    with pytest.raises(ValueError, match="batch has 16 rows; .* exactly 3 examples, 4 row"):
        opt.step(lambda slices=None: obj.loss(examples, slices))


def test_grzo_refuses_a_metric_of_greedy_generations(model_tok):
    model, tok = model_tok
    metric = CompletionObjective(model, tok, max_length=48, objective="f1")
    with pytest.raises(ValueError, match="cannot be their objective"):
        zoptim.GRZO(metric.parameters(), model=metric, examples=4, seed=3).step(
            lambda slices=None: metric.loss(SFT_EXAMPLES, slices))


@pytest.mark.parametrize("kind, rows, lr, drop", [
    ("generation", QA, 3e-5, 0.5), ("multiple_choice", MC_UNEVEN, 3e-5, 1.0)])
def test_grzo_steps_lower_the_training_loss(tiny, tmp_path, kind, rows, lr, drop):
    """GRZO on the tiny decoder's completions and multiple choice, batches of 4 of its 8
    training examples in turn: 60 steps lower their loss by more than ``drop`` (1.27 measured
    on completions, from 10.78; 2.35 on multiple choice of 2 to 4 options, from 7.21, and 1.5
    to 1.9 with the run's seed at 1 or 2). At lr 1e-4 multiple choice bounces: the loss after
    60 steps ended between 4.5 and 6.5 over machines and seeds: too close to a drop of 1."""
    run = build_run(tiny, write_jsonl(tmp_path / "data.jsonl", rows), kind,
                    "method.name=\"grzo\"", f"method.settings={{lr = {lr}, eps = 1e-3}}")
    examples = run.splits.train
    with torch.no_grad():
        before = float(run.clf.loss(examples))
    for step in range(60):
        half = examples[4 * (step % 2):4 * (step % 2) + 4]
        run.opt.step(step_loss(run, half))
    with torch.no_grad():
        after = float(run.clf.loss(examples))
    assert after < before - drop


def test_batched_queries_give_the_in_place_values_for_each_kind(tiny, tmp_path):
    for kind, rows in [("generation", QA), ("multiple_choice", MC)]:
        data = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        values = {}
        for batched in (False, True):
            run = build_run(tiny, data, kind, "method.name=\"zo-muon\"",
                            f"method.settings={{lr = 1e-3, eps = 1e-3, rank = 4, "
                            f"batched = {str(batched).lower()}}}")
            assert type(run.opt.evaluator).__name__ == ("BatchedQueries" if batched
                                                         else "InPlace")
            examples = run.splits.train[:4]
            run.opt.step(step_loss(run, examples))
            values[batched] = run.opt.last_values
        assert values[True] == pytest.approx(values[False], rel=1e-4), kind


def test_decoder_kinds_refuse_an_encoder_and_label_settings(tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", QA)
    base = ["train", "--out", str(tmp_path / "run"), "--no-progress",
            "--set", "task.kind=\"generation\"", "--set", f"task.path={json.dumps(str(data))}"]
    assert main(base + ["--set", "task.name=\"file\"", "--set", "model.name=\"minilm-l6\"",
                        "--set", "task.train=4", "--set", "task.dev=2",
                        "--set", "task.test=2"]) == 2
    assert "needs a decoder" in capsys.readouterr().err
    assert main(base + ["--set", "task.name=\"mr\""]) == 2
    assert "task.name must be 'file'" in capsys.readouterr().err
    assert main(base + ["--set", "task.name=\"file\"", "--set", "task.shots=4"]) == 2
    assert "task.shots" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- the task suite ----------------------------------------------------------------------------

HUB_ROWS = {
    "sst2": ({"sentence": "a gripping film ", "label": 1, "idx": 0}, Example,
             "a gripping film", 1),
    "rte": ({"premise": "A cat sleeps.", "hypothesis": "An animal sleeps.", "label": 0,
             "idx": 0}, Example, "Does this mean that \"An animal sleeps.\" is true?", 0),
    "cb": ({"premise": "It rained.", "hypothesis": "It was dry.", "label": 1, "idx": 0},
           Example, "Can we infer that \"It was dry.\"? Yes, No, or Maybe?", 1),
    "boolq": ({"question": "is water wet", "passage": "Water is a liquid.", "label": 1,
               "idx": 0}, Example, "Water is a liquid. is water wet?", 1),
    "wic": ({"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.",
             "start1": 10, "start2": 4, "end1": 14, "end2": 8, "label": 0, "idx": 0},
            Example, "Does the word \"bank\" have the same meaning", 0),
    "wsc": ({"text": "Mark told Pete he was late.", "span1_index": 0, "span2_index": 3,
             "span1_text": "Mark", "span2_text": "He", "label": 1, "idx": 0},
            Example, "does the pronoun \"he\" refer to Mark? Yes or No?", 1),
    "multirc": ({"paragraph": "Tom has two dogs.", "question": "How many dogs?",
                 "answer": "Two", "idx": {"paragraph": 0, "question": 0, "answer": 0},
                 "label": 1}, Example, "I found this answer \"Two\". Is that correct?", 1),
    "copa": ({"premise": "The man broke his toe.", "choice1": "He dropped a hammer.",
              "choice2": "He ate lunch.", "question": "cause", "label": 0, "idx": 0},
             Choice, ("The man broke his toe because", ("he dropped a hammer.",
                                                        "he ate lunch.")), 0),
    "record": ({"passage": "Ann met Bob.\n@highlight\nThey talked", "query":
                "@placeholder smiled.", "entities": ["Ann", "Bob", "Ann"],
                "entity_spans": {}, "answers": ["Bob"], "idx": {}},
               Choice, ("Ann met Bob.\n- They talked\n", ("Ann smiled.", "Bob smiled.")), 1),
    "winogrande": ({"sentence": "The cup fell off the table because _ was round.",
                    "option1": "the cup", "option2": "the table", "answer": "1"},
                   Choice, ("The cup fell off the table because", ("the cup was round.",
                                                                   "the table was round.")),
                   0),
    "squad": ({"id": "1", "title": "Paris", "context": "Paris is in France.",
               "question": "Where is Paris?", "answers": {"text": ["France", "in France"],
                                                          "answer_start": [12, 9]}},
              Completion, "Question: Where is Paris?\nAnswer:", ("France", "in France")),
    "drop": ({"section_id": "s", "query_id": "q", "passage": "Two goals, then one.",
              "question": "How many goals?", "answers_spans": {"spans": ["3"],
                                                               "types": ["number"]}},
             Completion, "Question: How many goals?\nAnswer:", ("3",)),
}


@pytest.mark.parametrize("name", sorted(HUB_ROWS))
def test_each_suite_task_reads_a_file_in_its_hub_layout(tmp_path, name):
    from zoptim.tasks.suite import SUITE, load_suite_task

    row, kind, expected, label = HUB_ROWS[name]
    pool, names = load_suite_task(name, str(write_jsonl(tmp_path / f"{name}.jsonl", [row])))
    e = pool[0]
    assert isinstance(e, kind) and names == list(SUITE[name].label_words)
    if kind is Example:
        assert expected in e.text and e.label == label
    elif kind is Choice:
        assert (e.context, e.options, e.label) == (expected[0], expected[1], label)
    else:
        assert e.prompt.endswith(expected) and e.answers == label
        assert e.completion == " " + label[0]
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"unrelated": 1}])
    with pytest.raises(DataError, match=f"broken.jsonl:1: not a {name} row"):
        load_suite_task(name, str(broken))


def test_a_suite_task_offline_names_task_path(monkeypatch):
    """Without the network (``datasets`` failing to reach the hub), or without ``datasets``
    at all, the error says to give the rows with task.path."""
    import sys
    import types

    from zoptim.tasks.suite import load_suite_task

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="could not load super_glue .*task.path"):
        load_suite_task("copa", None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets .*task.path"):
        load_suite_task("copa", None)


def test_suite_tasks_set_their_kind_and_label_words():
    rte = config.load(None, ["task.name=\"rte\""]).task
    assert (rte.kind, rte.label_words, rte.template) == \
        ("classification", ["Yes", "No"], "{text} {label}")
    sst2 = config.load(None, ["task.name=\"sst2\"", "task.label_words=[\"bad\", \"good\"]"])
    assert (sst2.task.label_words, sst2.task.template) == (["bad", "good"],
                                                           "{text} It was {label}.")
    copa = config.load(None, ["task.name=\"copa\""])
    assert copa.task.kind == "multiple_choice" and copa.model.name == "smollm2-135m"
    with pytest.raises(Exception, match="is a generation task"):
        config.load(None, ["task.name=\"squad\"", "task.kind=\"multiple_choice\""])


@pytest.mark.parametrize("name", ["rte", "copa", "squad"])
def test_a_suite_task_runs_from_its_file(tiny, tmp_path, name):
    row = HUB_ROWS[name][0]
    rows = [dict(row, label=i % 2) if "label" in row else row for i in range(12)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "run"
    line = ["train", "--out", str(out), "--no-progress"]
    for s in [f"model.name={json.dumps(str(tiny))}", f"task.name=\"{name}\"",
              f"task.path={json.dumps(str(data))}", "task.train=6", "task.dev=3", "task.test=3",
              "batch_size=3", "eval_batch_size=3", "model.max_length=64", "steps=2",
              "task.max_new_tokens=3", "method.name=\"mezo\"",
              "method.settings={lr = 1e-4, eps = 1e-3}"]:
        line += ["--set", s]
    assert main(line) == 0
    assert audit(out).ok


def test_a_metric_objective_is_one_minus_the_metric_of_generations(tiny, tmp_path):
    """objective = "f1": the loss is 1 - F1 of greedy generations, an unended one scoring 0;
    batched queries decode all slices in one stacked batch, each slice's generations those of
    its point evaluated in place; the run resumes and replays bit for bit."""
    data = write_jsonl(tmp_path / "data.jsonl", QA)
    texts = {}
    for batched in (False, True):
        # eps = 1 moves the tiny model's greedy tokens, so the slices generate different texts
        run = build_run(tiny, data, "generation", "task.objective=\"f1\"",
                        "task.max_new_tokens=4", "method.name=\"zo-muon\"",
                        "method.settings={lr = 1e-3, eps = 1.0, rank = 4, directions = 3, "
                        f"batched = {str(batched).lower()}}}")
        assert type(run.opt.evaluator).__name__ == ("BatchedQueries" if batched else "InPlace")
        examples = run.splits.train[:4]
        generated = run.clf.generate(examples)
        expected = 1 - sum(best_score("f1", text, e.answers) if ended else 0.0
                           for (text, ended), e in zip(generated, examples)) / 4
        assert float(run.clf.loss(examples)) == pytest.approx(expected)
        texts[batched] = []

        def record(slices=None):
            texts[batched] += [t for t, _ in run.clf.generate(examples, slices=slices or 1)]
            return run.clf.loss(examples, slices)

        run.opt.step(record)
        assert len(run.opt.last_values) == 4 and all(0 <= v <= 1 for v in run.opt.last_values)
    assert texts[True] == texts[False] and len(set(texts[True])) > 4
    out = tmp_path / "run"
    line = ["train", "--out", str(out), "--no-progress",
            *run_settings(tiny, data, "generation", "task.objective=\"f1\"",
                          "task.max_new_tokens=3", "save_every=1", "method.name=\"zo-muon\"",
                          "method.settings={lr = 1e-3, eps = 1e-3, rank = 4}")]
    assert main(line + ["--set", "steps=1"]) == 0
    assert main(line + ["--resume", "--set", "steps=2"]) == 0
    assert audit(out).ok
    with pytest.raises(Exception, match="metric of generations"):
        config.load(None, ["task.name=\"copa\"", "task.objective=\"f1\""])


def test_demonstrations_put_solved_training_examples_before_every_prompt():
    from zoptim.tasks import Prompt, Splits
    from zoptim.tasks.demonstrations import with_demonstrations

    def splits(train, dev):
        return Splits([], train, dev, [], record={"seed": 1})

    cls = with_demonstrations(splits([Example("Fun.", 1), Example("Dull.", 0)],
                                     [Example("Okay.", 1)]), 2, 0,
                              Prompt("{text} It was {label}.", ("terrible", "great")))
    solved = {"Fun.": "Fun. It was great.", "Dull.": "Dull. It was terrible."}
    order = [["Fun.", "Dull."][i] for i in cls.record["demonstrations"]]
    assert cls.dev[0].text == f"{solved[order[0]]}\n\n{solved[order[1]]}\n\nOkay."
    mc = with_demonstrations(splits([Choice("Sky is", ("blue", "red"), 0)],
                                    [Choice("Grass is", ("green", "pink"), 0)]), 1, 0, None)
    assert mc.dev[0].context == "Sky is blue\n\nGrass is"
    chat = Completion((("user", "2+2?"),), "4", ("4",))
    gen = with_demonstrations(splits([Completion("1+1=", " 2", ("2",))],
                                     [Completion("3+3=", " 6", ("6",)), chat]), 1, 0, None)
    assert gen.dev[0].prompt == "1+1= 2\n\n3+3="
    assert gen.dev[1].prompt == (("user", "1+1="), ("assistant", "2"), ("user", "2+2?"))
    with pytest.raises(ValueError, match="3 demonstrations"):
        with_demonstrations(splits([Example("a", 0)], []), 3, 0, None)


def test_a_run_with_demonstrations_and_their_refusal_for_an_encoder(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl",
                       [dict(HUB_ROWS["rte"][0], label=i % 2) for i in range(12)])
    line = ["train", "--no-progress", "--set", f"task.path={json.dumps(str(data))}",
            "--set", "task.name=\"rte\"", "--set", "task.train=6", "--set", "task.dev=3",
            "--set", "task.test=3", "--set", "task.demonstrations=2", "--set", "steps=1",
            "--set", "model.max_length=128", "--set", "batch_size=2",
            "--set", "method.name=\"mezo\"", "--set", "method.settings={lr = 1e-4, eps = 1e-3}"]
    out = tmp_path / "run"
    assert main(line + ["--out", str(out), "--set", f"model.name={json.dumps(str(tiny))}"]) == 0
    recorded = json.loads((out / "split.json").read_text())["demonstrations"]
    assert len(recorded) == 2 and audit(out).ok
    assert main(line + ["--out", str(tmp_path / "enc"), "--set", "model.name=\"minilm-l6\""]) == 2
    assert "not a decoder" in capsys.readouterr().err
    assert not (tmp_path / "enc").exists()
