"""The task suite of zeroth-order fine-tuning papers (MeZO's Table 1: SST-2, RTE, CB, BoolQ,
WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD, DROP; ZO-Bench adds WinoGrande), each read from the
Hugging Face hub through ``datasets``, or offline from ``task.path``: a JSON-lines or CSV file,
or a saved dataset, in the hub's column layout.

Each task turns a hub row into an example of its kind with a prompt in MeZO's manner
(Malladi et al., 2023, "Fine-Tuning Language Models with Just Forward Passes", Appendix E;
these are this project's wording): classification tasks end their text with a question that
a label word answers, multiple-choice tasks score each option as a continuation, and
question answering generates the answer. The pool is the hub's labelled splits together
(train, then validation; SuperGLUE's test labels are hidden); ``split`` then draws train,
dev and test from it with the run's seed (MeZO: 1,000 / 500 / 1,000).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zoptim.tasks.data import DataError, Example, data_path, read_rows
from zoptim.tasks.kinds import Choice, Completion

YES_NO = ("No", "Yes")  # label 0 is false, 1 true


@dataclass(frozen=True)
class SuiteTask:
    hub: tuple[str, str | None]  # dataset id and configuration
    splits: tuple[str, ...]  # the labelled splits that make the pool
    kind: str
    convert: Callable[[dict], object]  # a hub row -> an example of the kind
    label_words: tuple[str, ...] = ()  # classification: label i is answered by word i
    template: str = "{text} {label}"  # classification: where the label word follows the text


def _sst2(r: dict) -> Example:  # label 0: negative
    return Example(r["sentence"].strip(), int(r["label"]))


def _rte(r: dict) -> Example:  # label 0: entailment
    return Example(f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or '
                   "No?", int(r["label"]))


def _cb(r: dict) -> Example:  # 0 entailment, 1 contradiction, 2 neutral
    return Example(f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, '
                   "or Maybe?", int(r["label"]))


def _boolq(r: dict) -> Example:
    return Example(f'{r["passage"]} {r["question"]}?', int(r["label"]))


def _wic(r: dict) -> Example:
    return Example(f'Does the word "{r["word"]}" have the same meaning in these two sentences? '
                   f'Yes, No?\n{r["sentence1"]}\n{r["sentence2"]}', int(r["label"]))


def _wsc(r: dict) -> Example:
    return Example(f'{r["text"]}\nIn the previous sentence, does the pronoun '
                   f'"{r["span2_text"].lower()}" refer to {r["span1_text"]}? Yes or No?',
                   int(r["label"]))


def _multirc(r: dict) -> Example:
    return Example(f'{r["paragraph"]}\nQuestion: {r["question"]}\nI found this answer '
                   f'"{r["answer"]}". Is that correct? Yes or No?', int(r["label"]))


def _copa(r: dict) -> Choice:
    joint = " because" if r["question"] == "cause" else " so"
    options = tuple(c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"]))
    return Choice(r["premise"].rstrip(". ") + joint, options, int(r["label"]))


def _record(r: dict) -> Choice:
    """The query's ``@placeholder`` filled by each candidate entity: the passage and the
    query up to it are the context, the entity and the rest of the query the option."""
    head, _, tail = r["query"].partition("@placeholder")
    entities = list(dict.fromkeys(r["entities"]))
    answers = set(r["answers"])
    label = next((i for i, e in enumerate(entities) if e in answers), None)
    if label is None or len(entities) < 2:
        raise ValueError("a ReCoRD row needs two candidates and an answer among them")
    context = r["passage"].replace("@highlight\n", "- ") + "\n" + head.rstrip()
    return Choice(context, tuple(e + tail for e in entities), label)


def _winogrande(r: dict) -> Choice:
    """The sentence up to the blank is the context; each option, with the rest of the
    sentence after it, a continuation."""
    head, _, tail = r["sentence"].partition("_")
    options = tuple(o + tail for o in (r["option1"], r["option2"]))
    return Choice(head.rstrip(), options, int(r["answer"]) - 1)


def _squad(r: dict) -> Completion:
    answers = tuple(r["answers"]["text"])
    return Completion(f'Title: {r["title"]}\nContext: {r["context"]}\nQuestion: '
                      f'{r["question"]}\nAnswer:', " " + answers[0], answers)


def _drop(r: dict) -> Completion:
    answers = tuple(r["answers_spans"]["spans"])
    return Completion(f'Passage: {r["passage"]}\nQuestion: {r["question"]}\nAnswer:',
                      " " + answers[0], answers)


def _sglue(name: str, convert, words=YES_NO, kind="classification") -> SuiteTask:
    return SuiteTask(("super_glue", name), ("train", "validation"), kind, convert, words)


SUITE: dict[str, SuiteTask] = {
    "sst2": SuiteTask(("glue", "sst2"), ("train", "validation"), "classification", _sst2,
                      ("terrible", "great"), "{text} It was {label}."),
    "rte": _sglue("rte", _rte, ("Yes", "No")),
    "cb": _sglue("cb", _cb, ("Yes", "No", "Maybe")),
    "boolq": _sglue("boolq", _boolq),
    "wic": _sglue("wic", _wic),
    "wsc": _sglue("wsc.fixed", _wsc),
    "multirc": _sglue("multirc", _multirc),
    "copa": _sglue("copa", _copa, (), "multiple_choice"),
    "record": _sglue("record", _record, (), "multiple_choice"),
    "winogrande": SuiteTask(("allenai/winogrande", "winogrande_xl"), ("train", "validation"),
                            "multiple_choice", _winogrande),
    "squad": SuiteTask(("rajpurkar/squad", None), ("train", "validation"), "generation",
                       _squad),
    "drop": SuiteTask(("ucinlp/drop", None), ("train", "validation"), "generation", _drop),
}


def _hub_rows(name: str, task: SuiteTask):
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise DataError(f"the {name} task needs the datasets package: pip install datasets "
                        "(or give its rows with task.path)") from err
    hub_id, config = task.hub
    for split_name in task.splits:
        try:
            rows = load_dataset(hub_id, config, split=split_name)
        except Exception as err:  # offline, or the hub changed
            raise DataError(f"could not load {hub_id} ({config or 'default'}, {split_name}) "
                            f"from the hub ({type(err).__name__}); offline, give the task's "
                            "rows in the hub's columns with task.path") from err
        yield from ((f"{hub_id}/{split_name}:{n}", row) for n, row in enumerate(rows, 1))


def load_suite_task(name: str, path: str | None) -> tuple[list, list[str]]:
    """The labelled pool of suite task ``name``, from ``path`` (the hub's columns) or the
    hub, and its label names (the label words; none for the other kinds)."""
    task = SUITE[name]
    if path:
        p = data_path(path)
        rows = ((f"{p}:{n}", row) for n, row in read_rows(p))
    else:
        rows = _hub_rows(name, task)
    pool = []
    for where, row in rows:
        try:
            pool.append(task.convert(row))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise DataError(f"{where}: not a {name} row in the hub's columns "
                            f"({type(err).__name__}: {err})") from None
    if not pool:
        raise DataError(f"the {name} task has no rows")
    return pool, list(task.label_words)
