"""The generation-time benchmark runs end to end and writes its figures."""

import json

from conftest import MR_PATH
from zoptim.bench.generation import main, passages


def test_passages_have_the_asked_length():
    prompts = passages(["one two three", "four five"], 3, 10)
    context = prompts[0].prompt.split("Context: ")[1].split("\n")[0]
    assert len(prompts) == 3 and len(context.split()) == 10


def test_the_benchmark_times_cached_and_uncached_decoding(tiny, tmp_path):
    out = tmp_path / "gen.json"
    assert main(["--model", str(tiny), "--task-path", MR_PATH, "--examples", "4",
                 "--uncached", "2", "--words", "20", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["examples"] == 4 and record["prompt_tokens_mean"] > 20
    assert record["cache_speedup"] > 0 and "cached_s" in record


def test_cached_decoding_feeds_each_token_once(tiny):
    """What the cache speed-up rests on: without the cache every new token runs the whole
    prefix again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoptim.integrations.completions import CompletionObjective

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    objective = CompletionObjective(model, AutoTokenizer.from_pretrained(tiny), max_length=256,
                                    max_new_tokens=4)
    examples = passages(["one two three four five six"], 2, 30)
    fed = []
    model.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["input_ids"].numel()),
                                    with_kwargs=True)
    objective.generate(examples, 2, use_cache=True)
    cached, fed[:] = sum(fed), []
    objective.generate(examples, 2, use_cache=False)
    prompt = sum(len(objective.context_ids(e)) for e in examples)
    assert cached < prompt + 4 * len(examples) < sum(fed)
