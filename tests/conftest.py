import os

# The suite runs in as many worker processes as the machine has cores (pytest-xdist, see
# pyproject.toml), each on one thread, and so does every process a test starts: threads of
# two workers spinning at barriers on shared cores slow both by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _mr_file() -> str:
    """The movie-review snippets, through the project's own pinned download into its cache
    (the vaderSentiment archive on PyPI, checked against its SHA-256), as the mr task gets
    them: a clean clone needs nothing beside it."""
    from zoptim.tasks.data import MR_FILE, cache_dir, fetch_mr

    file = cache_dir() / "mr" / MR_FILE
    return str(file if file.exists() else fetch_mr(file.parent))


MR_PATH = _mr_file()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits, scaled to [0, 1], split 70/30 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0)
    return xtr, ytr, xte, yte


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A folder holding a tiny random Llama with SmolLM2's tokenizer (and chat template)."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from zoptim.integrations.models import _smollm2

    folder = tmp_path_factory.mktemp("tiny-llama")
    source, extra = _smollm2()
    tok = AutoTokenizer.from_pretrained(source, **extra)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
