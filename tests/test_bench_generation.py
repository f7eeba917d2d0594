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
    assert record["cached_s"] >= 0 and record["uncached_s_scaled"] >= 0
